"""Each head's pipeline task on fixed inputs.

No import of `modeling_diff`: a process without the package runs this too.
"""

import json

import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer, pipeline

TASKS = {  # pipeline task -> the Auto class it loads
    "feature-extraction": "AutoModel",
    "text-generation": "AutoModelForCausalLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}
TEXT = "def add(a, b): return a + b"
QUESTION = "What does add return?"


def run_task(task: str, folder, trust_remote_code: bool = False):
    """The task's pipeline from `folder` on fixed inputs; its result as plain JSON values."""
    if task == "question-answering":
        return answer_span(folder, trust_remote_code)
    pipe = pipeline(task, model=str(folder), trust_remote_code=trust_remote_code)
    if task == "text-generation":
        result = pipe(TEXT, max_new_tokens=6, do_sample=False)
    elif task == "feature-extraction":
        result = torch.tensor(pipe(TEXT)).sum(-1).tolist()  # one number per token
    else:
        result = pipe(TEXT)
    return json.loads(json.dumps(result, default=float))


def answer_span(folder, trust_remote_code: bool = False) -> dict:
    """transformers 5 has no question-answering pipeline: the head's start/end logits and the best span."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForQuestionAnswering.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()
    with torch.no_grad():
        out = model(**tokenizer(QUESTION, TEXT, return_tensors="pt"))
    start, end = out.start_logits[0], out.end_logits[0]
    span = [start.argmax().item(), end.argmax().item()]
    return {"start_logits": start.tolist(), "end_logits": end.tolist(), "span": span}
