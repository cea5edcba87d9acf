"""`diff-transformer convert`: Llama, DiffLlama or Motif-2.6B checkpoint -> DiffTransformer folder (conversion/)."""

from modeling_diff_conversion import convert


def add_arguments(parser):
    parser.add_argument(
        "source",
        help="a local model folder, a Hub id (resolved through the HF cache, so it works "
        "offline once cached) or a .gguf file",
    )
    parser.add_argument("output_dir", help="the folder to write; it must not exist or be empty (see --force)")
    parser.add_argument(
        "--variant",
        choices=["v2", "v1"],
        default=None,
        help="v2 (default for Llama): DIFF V2, computes the source's function exactly; v1: the "
        "paper's layout (does not preserve a Llama's function; the only choice for DiffLlama and "
        "Motif-2.6B, which convert exactly)",
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="weights dtype of the output; auto keeps the source's",
    )
    parser.add_argument(
        "--gguf-file",
        default=None,
        help="name of a .gguf file inside the SOURCE folder or Hub repo (needs the gguf package)",
    )
    parser.add_argument(
        "--no-verify", action="store_true", help="skip reloading the output and comparing its logits with the source"
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUTPUT_DIR")


def run(args) -> int:
    report = convert(
        args.source,
        args.output_dir,
        variant=args.variant,
        dtype=args.dtype,
        gguf_file=args.gguf_file,
        verify_output=not args.no_verify,
        force=args.force,
    )
    print(report.summary())
    return 0
