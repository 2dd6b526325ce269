"""Data: JSON Lines or a saved ``datasets`` dataset -> token ids and labels -> padded batches."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100


def load_records(path: str, *, split: Optional[str] = None, limit: Optional[int] = None) -> List[Tuple[str, dict]]:
    """Read ``(where, record)`` pairs: ``where`` names the source line (JSON Lines, 1-based, blank
    lines skipped) or row (a dataset saved with ``datasets.save_to_disk``, 0-based)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if not os.path.exists(path):
        raise ValueError(f"data file {path!r} does not exist")
    if os.path.isdir(path):
        return _load_saved_dataset(path, split, limit)
    records: List[Tuple[str, dict]] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}: line {lineno} is not UTF-8 text; expected JSON Lines "
                                 f"(one JSON object per line) or a directory saved with datasets") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                hint = ""
                if lineno == 1 and line.lstrip().startswith("["):
                    hint = " (the file looks like one JSON array; write one object per line instead)"
                elif line.strip() in ("{", "["):
                    hint = " (the file looks like pretty-printed JSON; write one object per line instead)"
                raise ValueError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}); "
                                 f"expected JSON Lines, one JSON object per line{hint}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {lineno} holds a JSON {type(rec).__name__}, expected an object "
                                 f"with the prompt/response or messages fields")
            records.append((f"{path}: line {lineno}", rec))
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise ValueError(f"{path}: no records (the file is empty)")
    return records


def _load_saved_dataset(path: str, split: Optional[str], limit: Optional[int]) -> List[Tuple[str, dict]]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("reading a saved dataset directory needs the datasets package: pip install datasets") from e
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise ValueError(f"{path!r} is a directory but not a dataset saved with datasets.save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        if split is None:
            if len(names) == 1 or "train" in names:
                split = "train" if "train" in names else names[0]
            else:
                raise ValueError(f"{path}: the dataset has splits {names}; choose one with --split")
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; the dataset has splits {names}")
        ds, where = ds[split], f"{path} [{split}]"
    else:
        where = path
    n = len(ds) if limit is None else min(limit, len(ds))
    records = [(f"{where}: row {i}", dict(ds[i])) for i in range(n)]
    if not records:
        raise ValueError(f"{where}: no records (the dataset is empty)")
    return records


@dataclass
class Encoded:
    """One example: token ids, labels (``-100`` where not scored) and whether it was truncated."""

    input_ids: List[int]
    labels: List[int]
    truncated: bool = False
    where: str = ""


def _field(record: dict, name: str, where: str):
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    return record[name]


def _text_field(record: dict, name: str, where: str, *, allow_empty: bool) -> str:
    value = _field(record, name, where)
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty: there is nothing to score")
    return value


def _ids(tokenizer, text: str, *, special: bool) -> List[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_pair(tokenizer, record, where, prompt_field, response_field):
    prompt = _text_field(record, prompt_field, where, allow_empty=True)
    response = _text_field(record, response_field, where, allow_empty=False)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: the probe scores the response followed by EOS")
    prompt_ids = _ids(tokenizer, prompt, special=True)
    response_ids = _ids(tokenizer, response, special=False) + [eos]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def _check_messages(messages, where, field_name):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field {field_name!r} must be a non-empty list of {{'role', 'content'}} "
                         f"messages, got {type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: {field_name}[{i}] must be an object with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: {field_name}[{i}]['content'] must be a string, got "
                             f"{type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ValueError(f"{where}: {field_name}[{i}] is an assistant turn with empty content: "
                             f"there is nothing to score")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: field {field_name!r} has no assistant turn: there is nothing to score")


def _encode_chat(tokenizer, record, where, messages_field):
    """Render the conversation with the chat template, prefix by prefix: the text each assistant
    turn adds after the generation prompt (its content and end-of-turn tokens) is scored."""
    messages = _field(record, messages_field, where)
    _check_messages(messages, where, messages_field)

    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja2 TemplateError, or a template's own raise_exception(...)
            raise ValueError(f"{where}: the chat template cannot render the first {len(msgs)} messages "
                             f"({type(e).__name__}: {e})") from None

    segments: List[Tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not before.startswith(done) or not upto.startswith(before) or len(upto) == len(before):
            raise ValueError(f"{where}: the tokenizer's chat template does not render this conversation prefix "
                             f"by prefix at message {i}, so the assistant tokens cannot be located")
        segments.append((before[len(done):], False))
        segments.append((upto[len(before):], True))
        done = upto
    ids: List[int] = []
    labels: List[int] = []
    for text, scored in segments:
        if not text:
            continue
        piece = _ids(tokenizer, text, special=False)
        ids += piece
        labels += piece if scored else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_records(
    tokenizer,
    records: Iterable[Tuple[str, dict]],
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    messages_field: Optional[str] = None,
    max_length: Optional[int] = None,
) -> List[Encoded]:
    """Token ids and labels for each record.

    Without ``messages_field``: ``tokenizer(prompt).input_ids`` (special tokens as the tokenizer
    adds them), then ``tokenizer(response, add_special_tokens=False).input_ids + [eos]``; only the
    response tokens and EOS are labelled.  With ``messages_field``: the chat template renders the
    conversation and the assistant turns are labelled.  Sequences longer than ``max_length`` are
    truncated on the right.
    """
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one context token and one scored token), got {max_length}")
    if messages_field is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--messages-field needs a tokenizer with a chat template; {type(tokenizer).__name__} "
                         f"has none (use --prompt-field/--response-field instead)")
    out = []
    for where, rec in records:
        if messages_field is not None:
            ids, labels = _encode_chat(tokenizer, rec, where, messages_field)
        else:
            ids, labels = _encode_pair(tokenizer, rec, where, prompt_field, response_field)
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        out.append(Encoded(ids, labels, truncated, where))
    return out


def make_batches(encoded: Sequence[Encoded], batch_size: int, pad_id: int, *, sort: bool = True) -> List[dict]:
    """Right-padded batches of ``input_ids``, ``attention_mask``, ``labels`` (int64 tensors).

    ``sort=True`` groups examples of similar length (longest first, so an out-of-memory shows at
    once); the statistics do not depend on the order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids)) if sort else range(len(encoded))
    order = list(order)
    batches = []
    for s in range(0, len(order), batch_size):
        group = [encoded[i] for i in order[s:s + batch_size]]
        T = max(len(e.input_ids) for e in group)
        ids = torch.full((len(group), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        labels = torch.full((len(group), T), IGNORE_INDEX, dtype=torch.long)
        for r, e in enumerate(group):
            n = len(e.input_ids)
            ids[r, :n] = torch.tensor(e.input_ids, dtype=torch.long)
            mask[r, :n] = 1
            labels[r, :n] = torch.tensor(e.labels, dtype=torch.long)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
