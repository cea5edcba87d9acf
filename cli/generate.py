"""`diff-transformer generate`: stream a completion (or a chat answer) to the terminal."""

import math

import torch
from modeling_diff_conversion import load_model
from transformers import TextStreamer

from .common import CLIError, add_option, say


def add_arguments(parser):
    parser.add_argument("model", help="model to generate with: a folder, a Hub id or a .gguf file")
    parser.add_argument("--prompt", required=True, help="the text to continue, or the user message with --chat")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", default=None, help="with --chat: a system message")
    add_option(parser, "max_new_tokens", type=int, default=64, help="how many tokens to generate at most")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 (the default) decodes greedily"
    )
    add_option(parser, "top_p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass")
    parser.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def prompt_ids(tokenizer, prompt: str, chat: bool, system: str | None = None) -> torch.Tensor:
    """Token ids of a plain prompt, or of a chat turn ready for the assistant's answer."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def stream(model, tokenizer, ids: torch.Tensor, max_new_tokens=64, temperature=0.0, top_p=1.0) -> torch.Tensor:
    """Generate from `ids`, printing tokens as they come; returns only the new token ids."""
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )
    return out[0, ids.shape[1] :]


def check_arguments(args) -> None:
    """Refuse sampling settings that cannot sample, before the model loads."""
    if not args.prompt.strip():
        raise CLIError("--prompt is empty: give the text to continue (or, with --chat, the user's message)")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CLIError(f"--temperature is {args.temperature}: give a finite number >= 0 (0 decodes greedily)")
    if not (math.isfinite(args.top_p) and 0 < args.top_p <= 1):
        raise CLIError(f"--top_p is {args.top_p}: give a share of the probability mass in (0, 1]")
    if args.max_new_tokens < 1:
        raise CLIError(f"--max_new_tokens is {args.max_new_tokens}: give a positive number")


def fit_to_context(prompt_tokens: int, max_new_tokens: int, context: int | None) -> int:
    """The tokens to generate after a prompt of `prompt_tokens` within a model context of `context` positions
    (max_position_embeddings): a prompt that fills the context is refused; an answer that would run past it is cut to
    the context, with a warning that says so."""
    if context is None:
        return max_new_tokens
    if prompt_tokens >= context:
        raise CLIError(
            f"the prompt has {prompt_tokens} tokens, but the model's context is {context} "
            "(max_position_embeddings): shorten the prompt"
        )
    if prompt_tokens + max_new_tokens > context:
        fitted = context - prompt_tokens
        say(
            f"warning: the prompt ({prompt_tokens} tokens) and --max_new_tokens {max_new_tokens} run past the model's "
            f"context of {context} tokens: generating {fitted} tokens"
        )
        return fitted
    return max_new_tokens


def run(args) -> int:
    check_arguments(args)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    ids = prompt_ids(tokenizer, args.prompt, args.chat, args.system)
    if ids.shape[1] == 0:
        raise CLIError(f"--prompt {args.prompt!r} has no tokens for this tokenizer: give some text")
    context = getattr(model.config, "max_position_embeddings", None)
    max_new_tokens = fit_to_context(ids.shape[1], args.max_new_tokens, context)
    stream(model, tokenizer, ids, max_new_tokens, args.temperature, args.top_p)
    return 0
