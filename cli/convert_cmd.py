"""`diff-transformer convert`: Llama, DiffLlama or Motif-2.6B checkpoint -> DiffTransformer folder (conversion/)."""

from modeling_diff_conversion import convert
from modeling_diff_conversion.output import InterruptedAfterWriting

from .common import add_option


def add_arguments(parser):
    parser.add_argument(
        "source",
        help="a local model folder, a Hub id (resolved through the HF cache, so it works "
        "offline once cached) or a .gguf file",
    )
    parser.add_argument(
        "output_dir",
        help="the folder to write: a new or empty folder, or an earlier output with --overwrite_output_dir",
    )
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
    add_option(
        parser, "gguf_file", help="name of a .gguf file inside the SOURCE folder or Hub repo (needs the gguf package)"
    )
    add_option(
        parser,
        "no_verify",
        action="store_true",
        help="skip reloading the output and comparing its logits with the source",
    )
    add_option(
        parser,
        "overwrite_output_dir",
        old=("--force",),
        action="store_true",
        help="replace an earlier output of diff-transformer at OUTPUT_DIR (never a folder it did not write)",
    )


def run(args) -> int:
    try:
        report = convert(
            args.source,
            args.output_dir,
            variant=args.variant,
            dtype=args.dtype,
            gguf_file=args.gguf_file,
            verify_output=not args.no_verify,
            force=args.overwrite_output_dir,
        )
    except InterruptedAfterWriting:
        raise  # the output is complete, and its message says so
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"nothing was written; {args.output_dir} is as it was before") from None
    print(report.summary())
    return 0
