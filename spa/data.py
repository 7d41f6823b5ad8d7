"""Loading preference pairs, prompts and demonstrations, and turning prompts into token ids.

Sources (any of data.seed, data.prompts, sft.data, eval.prompts, eval.pairs):
  - a .jsonl file (one JSON object per line) or a .json file (a list of objects);
  - anything else is passed to `datasets.load_dataset(source, split=...)` (a hub name when online, a local
    dataset folder, ...).

Row layouts (each field a string, or a chat-message list [{"role": ..., "content": ...}, ...]):
  pairs         {"prompt", "chosen", "rejected"}; UltraFeedback-binarized rows ("prompt" string, "chosen" /
                "rejected" message lists ending with the assistant turn, "score_chosen" / "score_rejected") too.
  prompts       {"prompt"} or {"messages"} (a trailing assistant turn is dropped); pair rows work as prompts.
  demonstrations {"prompt", "response" | "completion"} or {"messages"} ending with an assistant turn.
A malformed row raises DataError naming the file and line (JSON: index; datasets: split and row); with
data.skip_invalid it is skipped and counted instead.

Long prompts: a prompt is measured in tokens after the chat template. Longer than data.max_prompt_length, it is
skipped (data.long_prompts: skip, the default) or cut to its last max_prompt_length tokens (truncate); both are
counted and reported in the stage's metrics (data/prompts_skipped_long, data/prompts_truncated).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from typing import NamedTuple

logger = logging.getLogger("spa")

Messages = list[dict]


class DataError(ValueError):
    """A malformed data row: the message names the file and line (or dataset row) and the field."""


@dataclass
class LoadStats:
    rows: int = 0
    invalid: int = 0
    examples: list[str] = field(default_factory=list)

    def as_metrics(self, prefix: str) -> dict:
        return {f"{prefix}/rows": self.rows, f"{prefix}/invalid_skipped": self.invalid}


def _utf8_error(e: UnicodeDecodeError, column: int | None = None) -> str:
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at column {column or e.start + 1})"


def _read_source(source: str, split: str) -> list[tuple[str, object]]:
    """[(where, row)] where `where` names the row for error messages."""
    if source.endswith(".jsonl"):
        if not os.path.exists(source):
            raise DataError(f"{source} does not exist")
        out = []
        with open(source, "rb") as f:  # decoded line by line: a bad byte is that line's error, not the file's
            for n, raw in enumerate(f, 1):
                where = f"{source}:{n}"
                try:
                    line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    out.append((where, DataError(f"{where}: {_utf8_error(e)}")))
                    continue
                if not line.strip():
                    continue
                try:
                    out.append((where, json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((where, DataError(f"{where}: not valid JSON ({e.msg})")))
        return out
    if source.endswith(".json"):
        if not os.path.exists(source):
            raise DataError(f"{source} does not exist")
        with open(source, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
            raise DataError(f"{source}:{line}: {_utf8_error(e, column)}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{source}: expected a JSON list of objects, got {type(data).__name__}")
        return [(f"{source}[{i}]", row) for i, row in enumerate(data)]
    try:
        import datasets  # only for hub / dataset-folder sources
    except ImportError as e:
        raise DataError(f"{source} is not a .jsonl/.json file, and reading it as a dataset needs the datasets "
                        f"library ({e}; pip install datasets)") from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # noqa: BLE001 - offline, no such dataset or split, a bad folder: all one message
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise DataError(f"{source}: not a local .jsonl/.json file, and datasets.load_dataset({source!r}, "
                        f"split={split!r}) failed: {type(e).__name__}: {first}") from e
    return [(f"{source}[{split}] row {i}", row) for i, row in enumerate(ds)]


def _messages(value, where: str, name: str) -> Messages:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {name!r} is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value:
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: {name}[{j}] must be a {{'role': str, 'content': str}} message, got {m!r}")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"{where}: field {name!r} must be a string or a non-empty list of chat messages, "
                    f"got {type(value).__name__}")


def _response(value, where: str, name: str) -> str:
    if isinstance(value, str):
        if not value:
            raise DataError(f"{where}: field {name!r} is empty")
        return value
    msgs = _messages(value, where, name)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message of {name!r} must have role 'assistant', "
                        f"got {msgs[-1]['role']!r}")
    if not msgs[-1]["content"]:
        raise DataError(f"{where}: the assistant message of {name!r} is empty")
    return msgs[-1]["content"]


def _require(row, where: str, *names: str):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [n for n in names if row.get(n) is None]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(repr(m) for m in missing)} "
                        f"(has {', '.join(sorted(row)) or 'none'})")


def prompt_id(messages: Messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def parse_pair(row, where: str) -> dict:
    _require(row, where, "chosen", "rejected")
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], where, "prompt")
    elif isinstance(row["chosen"], list) and len(row["chosen"]) > 1:
        prompt = _messages(row["chosen"][:-1], where, "chosen")
    else:
        raise DataError(f"{where}: missing field 'prompt' (and 'chosen' is not a conversation to take it from)")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message, got role {prompt[-1]['role']!r}")
    pair = {"id": prompt_id(prompt), "prompt": prompt, "chosen": _response(row["chosen"], where, "chosen"),
            "rejected": _response(row["rejected"], where, "rejected")}
    for k in ("score_chosen", "score_rejected"):
        if row.get(k) is not None:
            if not isinstance(row[k], (int, float)) or isinstance(row[k], bool):
                raise DataError(f"{where}: field {k!r} must be a number, got {row[k]!r}")
            pair[k] = float(row[k])
    return pair


def parse_prompt(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], where, "prompt")
    elif row.get("messages") is not None:
        prompt = _messages(row["messages"], where, "messages")
        if prompt[-1]["role"] == "assistant":
            prompt = prompt[:-1]
        if not prompt:
            raise DataError(f"{where}: 'messages' holds no prompt before the assistant turn")
    else:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages'); has {', '.join(sorted(row)) or 'none'}")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the prompt must end with a user message, got role {prompt[-1]['role']!r}")
    return {"id": prompt_id(prompt), "prompt": prompt}


def parse_demo(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if row.get("messages") is not None and row.get("prompt") is None:
        msgs = _messages(row["messages"], where, "messages")
        if len(msgs) < 2:
            raise DataError(f"{where}: 'messages' needs a prompt and an assistant turn")
        return {"prompt": msgs[:-1], "response": _response(msgs, where, "messages")}
    key = "response" if row.get("response") is not None else "completion"
    _require(row, where, "prompt", key)
    return {"prompt": _messages(row["prompt"], where, "prompt"), "response": _response(row[key], where, key)}


def load(source: str, split: str, parse, skip_invalid: bool = False) -> tuple[list[dict], LoadStats]:
    """Rows of `source` parsed by parse_pair / parse_prompt / parse_demo."""
    stats, out = LoadStats(), []
    for where, row in _read_source(source, split):
        stats.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            out.append(parse(row, where))
        except DataError as e:
            if not skip_invalid:
                raise DataError(f"{e} (set data.skip_invalid=true to skip malformed rows)") from None
            stats.invalid += 1
            if len(stats.examples) < 3:
                stats.examples.append(str(e))
    if stats.invalid:
        logger.warning("%s: skipped %d malformed of %d rows, e.g. %s", source, stats.invalid, stats.rows,
                       "; ".join(stats.examples))
    if not out:
        raise DataError(f"{source}: no usable rows ({stats.rows} read, {stats.invalid} malformed)")
    return out, stats


def load_pairs(source, split, skip_invalid=False):
    return load(source, split, parse_pair, skip_invalid)


def load_prompts(source, split, skip_invalid=False):
    return load(source, split, parse_prompt, skip_invalid)


def load_demos(source, split, skip_invalid=False):
    return load(source, split, parse_demo, skip_invalid)


# --- seed and per-iteration prompt pools ----------------------------------------------------------------------

def split_validation(seed: list[dict], size: float) -> tuple[list[dict], list[dict]]:
    """(training pairs, validation pairs): `size` of the seed (a fraction < 1, or a count >= 1) held out, taken from
    its end, whole prompts at a time (the pairs of one prompt never sit on both sides)."""
    if size == 0:
        return seed, []
    n_val = int(size) if size >= 1 else max(1, round(size * len(seed)))
    cut = len(seed)
    held: set[str] = set()
    while cut > 0 and len(seed) - cut < n_val:
        held.add(seed[cut - 1]["id"])
        cut -= 1
    validation = [p for p in seed if p["id"] in held]
    train = [p for p in seed if p["id"] not in held]
    if not train:
        raise DataError(f"data.validation_size holds out {len(validation)} of the {len(seed)} seed pairs: none is "
                        "left to train on; lower data.validation_size or raise data.seed_size")
    return train, validation


def _count(size: float, total: int) -> int:
    return max(1, round(size * total)) if size <= 1 else int(size)


class SeedData(NamedTuple):
    seed: list[dict]  # gold pairs DPO is trained on (iteration 0)
    validation: list[dict]  # gold pairs held out of training: the judge's and every iteration's check
    pools: list[list[dict]]  # per iteration, its unlabelled prompts
    info: dict  # counts, for the stage's metrics


def seed_and_pools(cfg) -> SeedData:
    """The gold seed pairs (training and held-out validation) and, per iteration, its disjoint slice of unlabelled
    prompts; deterministic in cfg.seed.

    The seed is a seeded random data.seed_size of data.seed; data.validation_size of it (a fraction, or a count) is
    held out as validation and never trained on. The pool is data.prompts (default: the prompts of data.seed)
    minus every prompt of the seed (validation included), shuffled, then cut into data.iteration_prompts slices
    (the last slice size repeats when loop.iterations is larger). With data.iteration_prompt_files, iteration i's
    prompts are instead the i-th file, whole and in order, minus the seed's prompts and those of earlier files.
    Held-out prompts (eval.prompts, eval.pairs) that are also training prompts are counted and warned about."""
    d = cfg.data
    if not d.seed:
        raise DataError("data.seed is not set: the gold-labelled seed preferences are required")
    pairs, stats = load_pairs(d.seed, d.seed_split, d.skip_invalid)
    rng = random.Random(f"{cfg.seed}/seed")
    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_seed = _count(d.seed_size, len(pairs))
    if n_seed > len(pairs):
        raise DataError(f"data.seed_size asks for {n_seed} seed pairs but {d.seed} has {len(pairs)}")
    seed = [pairs[i] for i in order[:n_seed]]
    seed, validation = split_validation(seed, d.validation_size)
    info = {**stats.as_metrics("data/seed"), "data/seed_pairs": len(seed), "data/validation_pairs": len(validation)}
    seen = {p["id"] for p in seed + validation}
    if d.iteration_prompt_files:
        pools = _pools_from_files(cfg, seen, info)
    else:
        pools = _pools_from_one_pool(cfg, pairs, order[n_seed:], seen, info)
    info.update(held_out_overlap(cfg, seed + validation, pools))
    return SeedData(seed, validation, pools, info)


def _pools_from_one_pool(cfg, pairs: list[dict], rest: list[int], seen: set[str], info: dict) -> list[list[dict]]:
    """data.iteration_prompts slices of the shuffled pool (data.prompts, or the prompts of data.seed outside the
    seed), duplicates and the seed's prompts removed."""
    d = cfg.data
    if d.prompts:
        prompts, pstats = load_prompts(d.prompts, d.prompts_split, d.skip_invalid)
        info.update(pstats.as_metrics("data/prompts"))
        where = f"data.prompts ({d.prompts}: {len(prompts)} prompts)"
    else:
        prompts = [{"id": p["id"], "prompt": p["prompt"]} for p in (pairs[i] for i in rest)]
        where = (f"the prompts of data.seed outside the seed ({d.seed}: {len(pairs)} pairs, {len(pairs) - len(rest)} "
                 "taken by data.seed_size; set data.prompts for a pool of its own)")
    pool, dup = [], 0
    for p in prompts:  # unique prompts not in the seed
        if p["id"] in seen:
            dup += 1
            continue
        seen.add(p["id"])
        pool.append(p)
    random.Random(f"{cfg.seed}/pool").shuffle(pool)
    sizes = list(d.iteration_prompts)
    sizes += [sizes[-1]] * max(0, cfg.loop.iterations - len(sizes))
    counts = [_count(s, len(pool)) for s in sizes[:cfg.loop.iterations]]
    if sum(counts) > len(pool):
        raise DataError(
            f"data.iteration_prompts asks for {sum(counts)} prompts ({' + '.join(map(str, counts))} over "
            f"loop.iterations={cfg.loop.iterations}) but the prompt pool holds {len(pool)} distinct prompts: "
            f"{where}, {dup} of them repeated or among the seed's prompts. Lower data.iteration_prompts (counts, or "
            "fractions of the pool such as [0.3, 0.7]) or loop.iterations, or give more prompts (data.prompts, or "
            "one file per iteration with data.iteration_prompt_files)")
    pools, start = [], 0
    for c in counts:
        pools.append(pool[start:start + c])
        start += c
    info["data/pool_prompts"] = len(pool)
    return pools


def _pools_from_files(cfg, seen: set[str], info: dict) -> list[list[dict]]:
    """One pool per iteration from data.iteration_prompt_files, each file whole in its order; a prompt of the seed
    or of an earlier iteration's file is dropped (and counted)."""
    d, pools = cfg.data, []
    for k, source in enumerate(d.iteration_prompt_files[:cfg.loop.iterations]):
        prompts, pstats = load_prompts(source, d.prompts_split, d.skip_invalid)
        pool = []
        for p in prompts:
            if p["id"] not in seen:
                seen.add(p["id"])
                pool.append(p)
        if not pool:
            raise DataError(f"data.iteration_prompt_files[{k}] ({source}): none of its {len(prompts)} prompts is "
                            f"left for iteration {k + 1} after removing the seed's prompts and those of earlier files")
        pools.append(pool)
        info.update({**pstats.as_metrics(f"data/prompts_iter_{k + 1}"),
                     f"data/prompts_iter_{k + 1}_dropped": len(prompts) - len(pool)})
    info["data/pool_prompts"] = sum(len(p) for p in pools)
    return pools


_warned: set[str] = set()


def held_out_overlap(cfg, seed_pairs: list[dict], pools: list[list[dict]]) -> dict:
    """How many held-out prompts (eval.prompts, eval.pairs) are also training prompts (the seed pairs, validation
    included, or an iteration's prompts); warns once per process and source when any is. An evaluation on
    prompts the model trained on is not held out."""
    train = {p["id"] for p in seed_pairs} | {p["id"] for pool in pools for p in pool}
    out = {}
    for key, source, split, loader in (("eval.prompts", cfg.eval.prompts, cfg.eval.prompts_split, load_prompts),
                                       ("eval.pairs", cfg.eval.pairs, cfg.eval.pairs_split, load_pairs)):
        if not source:
            continue
        try:
            rows, _ = loader(source, split, cfg.data.skip_invalid)
        except DataError:  # reported by the eval stage itself
            continue
        rows = rows[:cfg.eval.max_prompts] if cfg.eval.max_prompts else rows
        n = sum(r["id"] in train for r in rows)
        out[f"data/{key.replace('.', '_')}_overlap"] = n
        msg = (f"{key}: {n} of the {len(rows)} held-out prompts used ({source}) are also training prompts (the seed "
               "pairs or the iterations' prompts): the evaluation is not held out for them; remove them from "
               f"{key} or from the training data")
        if n and msg not in _warned:
            _warned.add(msg)
            logger.warning(msg)
    return out


# --- prompts to tokens ----------------------------------------------------------------------------------------

class PromptEncoder:
    """Chat template + tokenisation + the long-prompt rule, with counts of what the rule did."""

    def __init__(self, tokenizer, max_prompt_length: int, long_prompts: str = "skip",
                 chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.max_len, self.rule = max_prompt_length, long_prompts
        if chat_template == "none":
            self.template = None
        else:
            self.template = chat_template or getattr(tokenizer, "chat_template", None)
        self.skipped = self.truncated = 0
        self.unk_id = getattr(tokenizer, "unk_token_id", None)
        self.unknown_tokens = self.texts_with_unknown = 0
        self.unknown_examples: dict[str, int] = {}  # text that became the unknown token -> how often
        self._warned_unknown = False

    def unlimited(self) -> PromptEncoder:
        """The same template and tokenizer without the length rule (for judge prompts built from prompts that
        already passed it: DLMA's p+/p- variants, LLM-as-judge questions)."""
        return PromptEncoder(self.tokenizer, 10 ** 9, chat_template="none" if self.template is None else self.template)

    def render(self, messages: Messages) -> str:
        if self.template is None:
            return "\n\n".join(m["content"] for m in messages)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)

    def encode(self, messages: Messages) -> list[int] | None:
        """Token ids of the prompt, or None when the long-prompt rule skips it."""
        text = self.render(messages)
        ids = self.tokenizer(text, add_special_tokens=self.template is None).input_ids
        self._note_unknown(text, ids)
        if len(ids) > self.max_len:
            if self.rule == "skip":
                self.skipped += 1
                return None
            self.truncated += 1
            ids = ids[-self.max_len:]
        return ids

    def encode_response(self, text: str) -> list[int]:
        """Response token ids followed by EOS (as TRL does for chosen/rejected)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        self._note_unknown(text, ids)
        eos = self.tokenizer.eos_token_id
        return ids + ([eos] if eos is not None else [])

    def _note_unknown(self, text: str, ids: list[int]) -> None:
        """Counts tokens that are the tokenizer's unknown token (text the model can neither see nor write) and,
        for the warning, which pieces of text they stand for."""
        if self.unk_id is None or self.unk_id not in ids:
            return
        n = ids.count(self.unk_id)
        self.unknown_tokens += n
        self.texts_with_unknown += 1
        if len(self.unknown_examples) < 20 and getattr(self.tokenizer, "is_fast", False):
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            for i, (a, b) in zip(enc.input_ids, enc.offset_mapping):
                if i == self.unk_id and b > a:
                    self.unknown_examples[text[a:b]] = self.unknown_examples.get(text[a:b], 0) + 1

    def unknown_warning(self) -> str | None:
        """The warning about text mapped to the unknown token, or None when there was none."""
        if not self.unknown_tokens:
            return None
        top = sorted(self.unknown_examples.items(), key=lambda kv: -kv[1])[:8]
        shown = ", ".join(f"{t!r} x{n}" for t, n in top)
        unk = getattr(self.tokenizer, "unk_token", "the unknown token")
        return (f"{self.unknown_tokens} token(s) in {self.texts_with_unknown} text(s) became the tokenizer's unknown "
                f"token {unk}" + (f" (e.g. {shown})" if shown else "") + ": the model cannot read or write these "
                "characters; use a tokenizer that covers the data (a character tokenizer: "
                "spa.tasks.chartok.char_tokenizer(chartok.data_chars(files)))")

    def metrics(self) -> dict:
        """Counts for the stage's metrics; logs the unknown-token warning (once per encoder)."""
        msg = self.unknown_warning()
        if msg and not self._warned_unknown:
            self._warned_unknown = True
            logger.warning(msg)
        return {"data/prompts_skipped_long": self.skipped, "data/prompts_truncated": self.truncated,
                "data/unknown_tokens": self.unknown_tokens, "data/texts_with_unknown_tokens": self.texts_with_unknown}


def prompt_text(messages: Messages) -> str:
    """The last user message: what a gold oracle sees as `prompt`."""
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")
