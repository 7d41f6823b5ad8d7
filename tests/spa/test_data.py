"""spa.data: every input layout, malformed rows (error naming file and line, or skipped and counted), the long-prompt
rule, and the seed / per-iteration prompt pools."""

import json

import pytest

from spa import Config
from spa.data import DataError, PromptEncoder, load_demos, load_pairs, load_prompts, seed_and_pools
from spa.tasks.chartok import char_tokenizer


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def user(text):
    return [{"role": "user", "content": text}]


def test_pairs_as_strings_and_messages(tmp_path):
    src = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "reverse: abc", "chosen": "cba", "rejected": "abc"},
        {"prompt": user("reverse: xy"), "chosen": [{"role": "assistant", "content": "yx"}],
         "rejected": [{"role": "assistant", "content": "xy"}]},
        "",  # blank lines are allowed
        {"chosen": user("reverse: pq") + [{"role": "assistant", "content": "qp"}],  # prompt taken from the chat
         "rejected": user("reverse: pq") + [{"role": "assistant", "content": "pq"}]},
    ])
    pairs, stats = load_pairs(src, "train")
    assert stats.rows == 3 and stats.invalid == 0
    assert [p["prompt"] for p in pairs] == [user("reverse: abc"), user("reverse: xy"), user("reverse: pq")]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("cba", "abc"), ("yx", "xy"), ("qp", "pq")]
    assert len({p["id"] for p in pairs}) == 3


def test_ultrafeedback_binarized_layout(tmp_path):
    row = {"prompt": "reverse: abc", "prompt_id": "x1",
           "chosen": user("reverse: abc") + [{"role": "assistant", "content": "cba"}],
           "rejected": user("reverse: abc") + [{"role": "assistant", "content": "ab"}],
           "messages": user("reverse: abc") + [{"role": "assistant", "content": "cba"}],
           "score_chosen": 9.0, "score_rejected": 3}
    pairs, _ = load_pairs(_jsonl(tmp_path / "uf.jsonl", [row]), "train_prefs")
    assert pairs[0]["chosen"] == "cba" and pairs[0]["rejected"] == "ab"
    assert pairs[0]["score_chosen"] == 9.0 and pairs[0]["score_rejected"] == 3.0
    prompts, _ = load_prompts(_jsonl(tmp_path / "uf2.jsonl", [row]), "train_prefs")  # pair rows work as prompts
    assert prompts[0]["prompt"] == user("reverse: abc")


def test_json_list_prompts_messages_and_demos(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"messages": user("hi") + [{"role": "assistant", "content": "x"}]},
                                                 {"prompt": "there"}]))
    prompts, _ = load_prompts(str(tmp_path / "p.json"), "train")
    assert [p["prompt"] for p in prompts] == [user("hi"), user("there")]
    demos, _ = load_demos(_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "a", "response": "b"}, {"prompt": "c", "completion": "d"},
        {"messages": user("e") + [{"role": "assistant", "content": "f"}]}]), "train")
    assert [(d["prompt"][-1]["content"], d["response"]) for d in demos] == [("a", "b"), ("c", "d"), ("e", "f")]


def test_datasets_source(tmp_path):
    """Anything that is not a .jsonl/.json path goes to datasets.load_dataset (here a local parquet folder)."""
    import datasets

    folder = tmp_path / "ds"
    folder.mkdir()
    datasets.Dataset.from_list([{"prompt": "reverse: ab", "chosen": "ba", "rejected": "ab"}] * 3).to_parquet(
        str(folder / "train.parquet"))
    pairs, stats = load_pairs(str(folder), "train")
    assert stats.rows == 3 and pairs[0]["chosen"] == "ba"


@pytest.mark.parametrize("line, match", [
    ('{"prompt": "a", "chosen": "b"', r"p\.jsonl:2: not valid JSON"),
    ('[1, 2]', r"p\.jsonl:2: expected a JSON object, got list"),
    ('{"prompt": "a", "chosen": "b"}', r"p\.jsonl:2: missing field\(s\) 'rejected'"),
    ('{"prompt": "a", "chosen": 3, "rejected": "c"}', r"p\.jsonl:2: field 'chosen' must be a string or"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', r"p\.jsonl:2: field 'chosen' is empty"),
    ('{"prompt": [{"role": "user"}], "chosen": "b", "rejected": "c"}', r"p\.jsonl:2: prompt\[0\] must be a"),
    ('{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}',
     r"p\.jsonl:2: the last message of 'chosen' must have role 'assistant'"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "score_chosen": "high"}',
     r"p\.jsonl:2: field 'score_chosen' must be a number"),
])
def test_malformed_pair_rows(tmp_path, line, match):
    src = _jsonl(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "b", "rejected": "c"}, line])
    with pytest.raises(DataError, match=match + r".*data\.skip_invalid=true"):
        load_pairs(src, "train")
    pairs, stats = load_pairs(src, "train", skip_invalid=True)
    assert len(pairs) == 1 and (stats.rows, stats.invalid) == (2, 1)


def test_malformed_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(str(tmp_path / "none.jsonl"), "train")
    (tmp_path / "d.json").write_text('{"prompt": 1}')
    with pytest.raises(DataError, match=r"d\.json: expected a JSON list"):
        load_prompts(str(tmp_path / "d.json"), "train")
    (tmp_path / "e.json").write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(DataError, match=r"e\.json:2: not valid JSON"):
        load_prompts(str(tmp_path / "e.json"), "train")
    (tmp_path / "f.json").write_text('[{"prompt": "a"}, {"text": "b"}]')
    with pytest.raises(DataError, match=r"f\.json\[1\]: missing field 'prompt' \(or 'messages'\); has text"):
        load_prompts(str(tmp_path / "f.json"), "train")
    src = _jsonl(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match=r"no usable rows \(2 read, 2 malformed\)"):
        load_pairs(src, "train", skip_invalid=True)


def test_long_prompt_rule_and_chat_template():
    tok = char_tokenizer()
    enc = PromptEncoder(tok, max_prompt_length=12, long_prompts="skip")
    text = enc.render(user("abc"))
    assert text == "<s><|user|>abc<|assistant|>"  # the tokenizer's chat template with the generation prompt
    assert len(enc.encode(user("abcd"))) == 1 + 1 + 4 + 1
    assert enc.encode(user("abcdefghijklmnop")) is None
    trunc = PromptEncoder(tok, max_prompt_length=12, long_prompts="truncate")
    ids = trunc.encode(user("abcdefghijklmnop"))
    assert len(ids) == 12 and tok.decode(ids[-1:]) == "<|assistant|>"  # the last tokens are kept
    assert enc.metrics() == {"data/prompts_skipped_long": 1, "data/prompts_truncated": 0, "data/unknown_tokens": 0,
                             "data/texts_with_unknown_tokens": 0}
    assert trunc.metrics() == {"data/prompts_skipped_long": 0, "data/prompts_truncated": 1, "data/unknown_tokens": 0,
                               "data/texts_with_unknown_tokens": 0}
    assert enc.encode_response("cba")[-1] == tok.eos_token_id
    plain = PromptEncoder(tok, 100, chat_template="none")
    assert plain.render(user("abc")) == "abc"


def test_seed_and_pools(task, tmp_path):
    cfg = Config.from_dict({"output_dir": str(tmp_path), "data": {"seed": task["prefs"], "seed_size": 0.1,
                                                                   "validation_size": 0.25,
                                                                   "iteration_prompts": [30, 0.25]},
                            "loop": {"iterations": 3}})
    seed, val, pools, info = seed_and_pools(cfg)
    # 120 pairs: 10% seed = 12, of which 25% = 3 held out for validation; 108 prompts in the pool
    assert len(seed) == 9 and len(val) == 3 and [len(p) for p in pools] == [30, 27, 27]
    ids = [p["id"] for pool in pools for p in pool]
    assert len(set(ids)) == len(ids) and not set(ids) & {p["id"] for p in seed + val}
    assert not {p["id"] for p in seed} & {p["id"] for p in val}  # validation is never trained on
    assert info["data/seed_pairs"] == 9 and info["data/validation_pairs"] == 3 and info["data/pool_prompts"] == 108
    again, val2, pools2, _ = seed_and_pools(cfg)
    assert again == seed and val2 == val and pools2 == pools  # deterministic in cfg.seed
    other, _, _, _ = seed_and_pools(cfg.replace(seed=1))
    assert other != seed
    no_val, none, _, _ = seed_and_pools(cfg.replace(**{"data.validation_size": 0}))
    assert len(no_val) == 12 and none == [] and no_val[:9] == seed
    counted, val5, _, _ = seed_and_pools(cfg.replace(**{"data.validation_size": 5}))
    assert len(counted) == 7 and len(val5) == 5
    with pytest.raises(DataError, match="holds out 12 of the 12 seed pairs"):
        seed_and_pools(cfg.replace(**{"data.validation_size": 12}))
    one, val1, _, _ = seed_and_pools(cfg.replace(**{"data.validation_size": 1}))
    assert len(one) == 11 and len(val1) == 1  # a count of 1, not "all of it"
    with pytest.raises(DataError, match=r"data.iteration_prompts asks for 170 prompts "
                                        r"\(50 \+ 60 \+ 60 over loop.iterations=3\) but the prompt pool holds 108"):
        seed_and_pools(cfg.replace(**{"data.iteration_prompts": [50, 60]}))
    with pytest.raises(DataError, match="data.seed is not set"):
        seed_and_pools(Config())


def test_validation_split_keeps_the_pairs_of_a_prompt_together():
    from spa.data import split_validation

    seed = [{"id": i} for i in "abcdeffgg"]  # prompts f and g have two pairs each
    train, val = split_validation(seed, 3)
    assert [p["id"] for p in val] == ["f", "f", "g", "g"] and [p["id"] for p in train] == list("abcde")
    train, val = split_validation(seed, 0.25)  # round(2.25) = 2 pairs: prompt g
    assert [p["id"] for p in val] == ["g", "g"] and len(train) == 7
    assert split_validation(seed, 0) == (seed, [])
    with pytest.raises(DataError, match="none is left to train on"):
        split_validation([{"id": "a"}, {"id": "a"}], 1)
