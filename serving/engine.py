"""The model behind the server. With continuous batching (transformers' `init_continuous_batching`: a paged KV cache,
a thread of its own), the batch decodes greedily with no logits processor, so that a greedy request in it answers
exactly what `generate()` answers; any other request (it samples, sets a penalty or a logit bias) runs alone with
`generate()` and its own settings, on a thread of its own, each of its forwards taking turns with the batch's."""

import asyncio
import contextlib
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch
from modeling_diff_conversion.loading import motif_config
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.generation import BaseStreamer
from transformers.generation.continuous_batching.utils import WorkloadHints

import modeling_diff  # noqa: F401  (registers diff_transformer with the Auto classes)

from .config import ServeArguments, ServingError

# generation-config fields that do not change what a greedy batch computes: a model whose config sets any other (a
# repetition penalty, banned words, beams, ...) answers every request with generate()
BATCH_NEUTRAL_SETTINGS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "max_length", "max_new_tokens", "do_sample", "temperature",
    "top_k", "top_p", "min_p", "typical_p", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict_in_generate", "transformers_version", "_from_model_config",
}
SAMPLING_SETTINGS = {"temperature", "top_k", "top_p", "min_p", "typical_p", "seed"}  # what greedy decoding ignores


class ModelStopped(RuntimeError):
    """The batch's thread died: the server cannot answer any more (HTTP 503; it exits with status 3)."""


class Engine:
    """The model and its tokenizer (loaded from `source`); `answer()` streams an answer from the batch or from
    `generate()`."""

    def __init__(self, model, tokenizer, context_length: int, batching=None, source: str | None = None):
        self.model, self.tokenizer, self.context_length, self.source = model, tokenizer, context_length, source
        self.vocab_size = model.config.get_text_config().vocab_size
        eos = model.generation_config.eos_token_id
        self.eos = set(eos) if isinstance(eos, list) else {eos}
        self.failure = None  # why the batch died, once it has
        self.local = threading.local()  # on the thread that answers alone: the batch's pause it holds
        self.alone = ThreadPoolExecutor(1, "generate", lambda: setattr(self.local, "pause", contextlib.ExitStack()))
        self.manager = None
        if batching is not None and set(model.generation_config.to_diff_dict()) <= BATCH_NEUTRAL_SETTINGS:
            self.manager = start_greedy_batching(model, batching, context_length)
            model.register_forward_pre_hook(self.pause_the_batch)
            model.register_forward_hook(self.resume_the_batch, always_call=True)

    @classmethod
    def load(cls, model: str, arguments: ServeArguments, name: str | None = None) -> "Engine":
        """`model`: a folder, a Hub id or a .gguf file (`name`: as errors call it)."""
        folder, _, gguf_file = model.rpartition("/") if model.endswith(".gguf") else (model, "", None)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        motif = motif_config(folder or ".", gguf_file, name or model)  # a Motif-2.6B folder loads as its V1 model
        if motif is not None:
            kwargs["config"] = motif
        try:
            loaded = AutoModelForCausalLM.from_pretrained(
                folder or ".", dtype=arguments.dtype, device_map=arguments.device,
                attn_implementation=arguments.attn_implementation, **kwargs,
            )
        except Exception as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ServingError(f"cannot load {name or model}: {reason}") from error
        context = loaded.config.get_text_config().max_position_embeddings
        if arguments.max_model_len is not None and context is not None and arguments.max_model_len > context:
            raise ServingError(f"--max-model-len {arguments.max_model_len} is above the model's context ({context})")
        tokenizer = AutoTokenizer.from_pretrained(folder or ".", **kwargs)
        return cls(loaded.eval(), tokenizer, arguments.max_model_len or context, arguments.batching_config(), model)

    @property
    def alive(self) -> bool:
        return self.manager is None or self.manager.is_running()

    def close(self) -> None:
        if self.manager is not None and self.manager.is_running():
            self.manager.stop(block=True, timeout=5, hard_stop=True)
        self.alone.shutdown(wait=False, cancel_futures=True)

    def answer(self, prompt: list[int], settings: dict, max_new_tokens: int, stop=()) -> "Answer":
        """The answer to `prompt`, with generate()'s `settings` on top of the model's generation config."""
        if not settings.get("do_sample", self.model.generation_config.do_sample):  # greedy
            settings = {name: value for name, value in settings.items() if name not in SAMPLING_SETTINGS}
            settings["do_sample"] = False
        if self.manager is not None and set(settings) == {"do_sample"}:
            tokens = self.batched(prompt, max_new_tokens)
        else:
            tokens = self.generated_alone(prompt, {**settings, "max_new_tokens": max_new_tokens})
        return Answer(tokens, self.tokenizer, self.eos, stop)

    async def batched(self, prompt: list[int], max_new_tokens: int):
        outputs, request_id = asyncio.Queue(), uuid.uuid4().hex
        self.manager.register_result_handler(request_id, outputs.put_nowait)
        added = self.manager.add_request(prompt, request_id=request_id, max_new_tokens=max_new_tokens, streaming=True)
        if added is None:
            raise ModelStopped(self.failure or "the batch is stopping")
        finished, sent = False, 0
        try:
            while not finished:
                output = await outputs.get()
                if output.error is not None:
                    await asyncio.sleep(0.2)  # a batch that dies fails its requests, then stops
                    if self.manager.is_running():
                        raise RuntimeError(output.error)
                    self.failure = self.failure or output.error
                    raise ModelStopped(self.failure)
                finished = output.is_finished()
                yield output.generated_tokens[sent:]
                sent = len(output.generated_tokens)
        finally:
            if not finished:  # the client left, or the answer reached a stop string
                self.manager.cancel_request(request_id)
                # transformers keeps the handler of a request cancelled before its end: it now holds nothing
                self.manager.register_result_handler(request_id, lambda output: None)

    async def generated_alone(self, prompt: list[int], settings: dict):
        loop = asyncio.get_running_loop()
        outputs = asyncio.Queue()
        stream = Stream(lambda tokens: loop.call_soon_threadsafe(outputs.put_nowait, tokens))
        job = loop.run_in_executor(self.alone, self.generate, prompt, settings, stream)
        job.add_done_callback(lambda job: job.cancelled() or job.exception())  # read, when nobody awaits it
        try:
            while (tokens := await outputs.get()) is not None:
                yield tokens
            await job  # raises generate()'s error, if any
        finally:
            stream.stopped.set()

    def generate(self, prompt: list[int], settings: dict, stream: "Stream") -> None:
        """generate() on the thread that answers alone. A seed is reproducible: the only user of the random numbers
        while it runs (the batch draws none)."""
        try:
            if stream.stopped.is_set():  # its client left while it waited
                return
            if (seed := settings.pop("seed", None)) is not None:
                torch.manual_seed(seed)
            input_ids = torch.tensor([prompt], device=self.model.device)  # [1, prompt]
            self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), streamer=stream,
                                stopping_criteria=StoppingCriteriaList([stream]), **settings)
        finally:
            stream.end()

    def pause_the_batch(self, module, args) -> None:
        """Before each forward on the thread that answers alone: pause the batch (transformers' `manager.pause()`),
        so that the two take turns. They must not run at once: a forward sets `config.is_causal` for its duration
        (transformers' `merge_with_config_defaults`), the batch's to False."""
        if (pause := getattr(self.local, "pause", None)) is not None:
            pause.enter_context(self.manager.pause())

    def resume_the_batch(self, module, args, output) -> None:
        if (pause := getattr(self.local, "pause", None)) is not None:
            pause.close()


def start_greedy_batching(model, batching, context_length: int):
    """transformers' continuous-batching manager for `model`: greedy (no sampling, no logits processor), its paged
    cache created, started. ServingError, saying what to change, when the cache cannot fit or hold a request of the
    whole context."""
    config = model.generation_config
    greedy = GenerationConfig(do_sample=False, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                              bos_token_id=config.bos_token_id)
    try:
        manager = model.init_continuous_batching(generation_config=greedy, continuous_batching_config=batching,
                                                 workload_hints=WorkloadHints(max_prompt_length=context_length))
        manager.warmup()  # creates the paged cache
    except (ValueError, MemoryError, RuntimeError) as error:
        raise ServingError(f"the paged KV cache does not fit ({str(error).splitlines()[0]}): raise "
                           "--max-memory-percent or --num-blocks, or lower --max-batch-tokens") from error
    tokens = manager.continuous_batching_config.num_blocks * manager.continuous_batching_config.page_size
    if tokens < context_length:
        raise ServingError(f"the paged KV cache holds {tokens} tokens, less than one request of the whole context "
                           f"({context_length}): raise --max-memory-percent or --num-blocks, or lower --max-model-len")
    manager.start()
    return manager


class Stream(BaseStreamer, StoppingCriteria):
    """generate()'s streamer, handing each step's new token ids to `send` (then None), and its stopping criterion,
    ending it once `stopped` is set (its client left, or its answer reached a stop string)."""

    def __init__(self, send):
        self.send, self.prompt_seen, self.stopped = send, False, threading.Event()

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:  # generate() puts the prompt first
            self.send(value.reshape(-1).tolist())
        self.prompt_seen = True

    def end(self) -> None:
        self.send(None)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stopped.is_set(), dtype=torch.bool, device=input_ids.device)


class Answer:
    """A request's answer as text pieces (`async for piece in answer`), ending before its first `stop` string; then
    `completion_tokens` and `finish_reason` (stop: the model's end or a stop string; length: the token limit).

    Tokens are decoded in a window, a piece sent once it ends on a whole character and the rest flushed at the end,
    so that the pieces add up to the text of the whole answer, even one that ends inside a character.
    """

    def __init__(self, tokens, tokenizer, eos: set[int], stop=()):
        self.tokens, self.tokenizer, self.eos, self.stop = tokens, tokenizer, eos, tuple(stop or ())
        self.ids, self.start, self.read = [], 0, 0  # decoded: ids[start:], of which ids[start:read] was sent
        self.held, self.stopped = "", False  # text that may begin a stop string; a stop string was found
        self.completion_tokens, self.finish_reason = 0, "length"

    async def __aiter__(self):
        async with contextlib.aclosing(self.tokens) as tokens:
            async for ids in tokens:
                self.ids += ids
                self.completion_tokens += len(ids)
                if ids and ids[-1] in self.eos:
                    self.finish_reason = "stop"
                if text := self.cut(self.decoded()):
                    yield text
                if self.stopped:
                    return  # closing `tokens` cancels the generation
        if text := self.cut(self.decoded(flush=True), final=True):
            yield text

    async def text(self) -> str:
        return "".join([piece async for piece in self])

    def decoded(self, flush: bool = False) -> str:
        sent = self.tokenizer.decode(self.ids[self.start : self.read], skip_special_tokens=True)
        text = self.tokenizer.decode(self.ids[self.start :], skip_special_tokens=True)
        if len(text) > len(sent) and (flush or not text.endswith("\ufffd")):
            self.start, self.read = self.read, len(self.ids)
            return text[len(sent) :]
        return ""

    def cut(self, text: str, final: bool = False) -> str:
        """`text` up to the first stop string, less what may begin one (held back until the next piece or `final`)."""
        text = self.held + text
        found = [index for index in (text.find(stop) for stop in self.stop) if index >= 0]
        if found:
            self.held, self.stopped, self.finish_reason = "", True, "stop"
            return text[: min(found)]
        keep = 0 if final else min(max(map(len, self.stop), default=1) - 1, len(text))
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]
