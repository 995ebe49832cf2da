"""Chat and prompt-completion data: the store keeps the loss mask and the sample table; the fingerprint
covers the format and its settings; bad input is one clear message (exit 2) before anything is published;
over-long samples are refused or truncated and counted.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from chat_data import CHAT_CONFIG, TEMPLATE, chat_cfg, conversation, expected_tokens_and_mask, write_jsonl
from conftest import run_cli

from moetrain import data
from moetrain.data.packing import sample_fit
from moetrain.errors import UserError


def split_samples(store, split):
    """Each stored sample of ``split``: (tokens, mask)."""
    table, tokens, mask = store.samples(split), store.tokens(split), store.mask(split)
    starts = list(table["start"]) + [len(tokens)]
    return [(tokens[a:b], mask[a:b]) for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant"])
def test_a_chat_store_holds_each_samples_tokens_and_mask(tmp_path, train_on):
    records = [conversation(i, turns=1 + i % 3) for i in range(30)]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    store = data.prepare_tokens(chat_cfg([path], tmp_path / "cache", train_on=train_on))
    index = store.index
    assert index["format"] == "chat" and index["train_on"] == train_on and store.holds_samples
    val_ids = [i for i in range(30) if data.is_val_piece(i, 0.1)]
    assert val_ids == [0, 10, 20]  # record i is held out as piece i is
    for split, ids in [("val", val_ids), ("train", [i for i in range(30) if i not in val_ids])]:
        got = split_samples(store, split)
        assert len(got) == len(ids) == index["splits"][split]["samples"]
        for (tokens, mask), i in zip(got, ids):
            want_tokens, want_mask = expected_tokens_and_mask(records[i]["messages"], train_on)
            assert np.array_equal(tokens, want_tokens) and np.array_equal(mask, want_mask)
        assert list(store.samples(split)["row"]) == [i + 1 for i in ids]  # JSON Lines line numbers
        assert index["splits"][split]["targets"] == sum(int(m[1:].sum()) for _, m in got)


def test_prompt_completion_trains_on_the_completion_and_its_end(tmp_path):
    records = [{"prompt": f"Q{i}: ", "completion": f"A{i}" * (1 + i % 2)} for i in range(12)]
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    store = data.prepare_tokens(chat_cfg([path], tmp_path / "cache", format="prompt_completion", chat_template=None))
    (tokens, mask), *_ = split_samples(store, "val")
    prompt, completion = records[0]["prompt"].encode(), records[0]["completion"].encode()
    assert tokens.tolist() == list(prompt) + list(completion) + [256]  # the byte tokenizer's end-of-document
    assert mask.tolist() == [0] * len(prompt) + [1] * (len(completion) + 1)


def test_a_datasets_folder_gives_the_store_of_the_same_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [conversation(i) for i in range(20)]
    jsonl = data.prepare_tokens(chat_cfg([write_jsonl(tmp_path / "c.jsonl", records)], tmp_path / "a"))
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    folder = data.prepare_tokens(chat_cfg([tmp_path / "ds"], tmp_path / "b"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "dd"))
    split_folder = data.prepare_tokens(chat_cfg([tmp_path / "dd"], tmp_path / "c"))
    for split in ("train", "val"):
        for store in (folder, split_folder):
            assert [(t.tolist(), m.tolist()) for t, m in split_samples(store, split)] == [
                (t.tolist(), m.tolist()) for t, m in split_samples(jsonl, split)
            ]
    assert folder.index["record_sources"] == [{"path": str(tmp_path / "ds"), "kind": "datasets"}]
    with pytest.raises(UserError, match=r"holds the splits \['train'\], not 'test'; set data.hub_split"):
        data.prepare_tokens(chat_cfg([tmp_path / "dd"], tmp_path / "d", hub_split="test"))


def test_the_fingerprint_covers_the_format_and_its_settings(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(10)])
    cache = tmp_path / "cache"
    base = data.store_folder(chat_cfg([path], cache))
    assert data.store_folder(chat_cfg([path], cache, train_on="last_assistant")) != base
    assert data.store_folder(chat_cfg([path], cache, chat_template=TEMPLATE.replace("<|end|>", "<|eot|>"))) != base
    assert data.store_folder(chat_cfg([path], cache, format="prompt_completion")) != base
    # what only applies when the store is opened does not re-tokenize
    for same in (dict(seq_len=64), dict(overlong="truncate"), dict(packing="none"), dict(num_workers=2)):
        assert data.store_folder(chat_cfg([path], cache, **same)) == base
    # a text source's fingerprint ignores the chat settings (stores of text stay valid)
    text = tmp_path / "a.txt"
    text.write_text("hello " * 100)
    plain = data.DataConfig(paths=[str(text)], cache_dir=str(cache))
    assert data.store_folder(plain.model_copy(update={"train_on": "last_assistant", "chat_template": "{{x}}"})) == (
        data.store_folder(plain)
    )


def test_overlong_samples_are_refused_or_truncated_and_counted(tmp_path):
    """Two samples do not fit 100 + 1 tokens: refused, naming the first one's line; truncated, and the one
    whose only assistant tokens lie past the cut is dropped."""
    records = [conversation(i) for i in range(20)]
    records[5] = conversation(5, turns=3)  # train sample, line 6
    records[7] = {"messages": [{"role": "user", "content": "x" * 80}, {"role": "assistant", "content": "late"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    with pytest.raises(UserError) as err:
        data.prepare_tokens(chat_cfg([path], tmp_path / "cache", seq_len=100))
    assert str(err.value).startswith(f"data: the train split: data file {str(path)!r} line 6 gives 186 tokens, more ")
    assert "(2 of its 18 samples are; the longest has 186); raise data.seq_len" in str(err.value)
    assert "data.overlong: truncate" in str(err.value)
    cfg = chat_cfg([path], tmp_path / "cache", seq_len=100, overlong="truncate")
    store = data.prepare_tokens(cfg)  # the same store: truncation happens when it is opened
    fit = sample_fit(store, cfg)
    assert (fit.splits["train"].truncated, fit.splits["train"].dropped) == (2, 1)
    assert (
        "train 18 samples (longest 186 tokens), 2 longer than data.seq_len + 1 = 101 tokens truncated (1 of them"
        in (fit.summary())
    )
    rows = data.split_rows(store, "train", cfg)
    assert sorted(np.concatenate(rows.rows).tolist()) == list(range(17))  # 18 samples, 1 dropped
    assert max(rows.fit.lengths) == 101


CLI_CHAT = [
    f"data.chat_template={json.dumps(TEMPLATE)}",
    "data.format=chat",
    "data.seq_len=128",
    "model.max_seq_len=128",
]


def prepare_cli(tmp_path, path, *extra):
    return run_cli(
        "prepare", str(CHAT_CONFIG), f"data.paths=[{path}]", f"data.cache_dir={tmp_path / 'cache'}", *CLI_CHAT, *extra
    )


def assert_refused(proc, tmp_path, message: str) -> None:
    """Exit 2, one `error:` line saying ``message``, no traceback, and nothing in the cache (not even a temp)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    cache = tmp_path / "cache"
    assert not cache.exists() or not [p for p in cache.iterdir() if p.name != "tokenizers"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"text": "hi"}, "line 3: no 'messages' field (the record has ['text']); data.format: chat needs"),
        (
            {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            "line 3: messages[0] has the unknown role 'robot'; the roles are system, developer, user, assistant, tool",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "line 3: no assistant message"),
        (
            {"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]},
            "line 3: messages[0].content must be a string, not list",
        ),
    ],
)
def test_a_bad_record_is_one_message_naming_its_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(0), conversation(1), bad, conversation(3)])
    assert_refused(prepare_cli(tmp_path, path), tmp_path, f"data file {str(path)!r} {message}")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("workers", [0, 2])
def test_a_record_the_template_cannot_render_stops_preparation_and_publishes_nothing(tmp_path, workers):
    """Found while encoding (in a spawned worker with 2): the message names the record, nothing is published."""
    records = [conversation(i) for i in range(40)]
    records[33] = {"messages": [{"role": "user", "content": "BOOM"}, {"role": "assistant", "content": "b"}]}
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    template = "{% if messages[0]['content'] == 'BOOM' %}{{ raise_exception('no BOOM here') }}{% endif %}" + TEMPLATE
    proc = prepare_cli(tmp_path, path, f"data.chat_template={json.dumps(template)}", f"data.num_workers={workers}")
    assert_refused(
        proc,
        tmp_path,
        f"data file {str(path)!r} line 34: the chat template (data.chat_template) does not render it: "
        "TemplateError: no BOOM here",
    )


def test_a_sample_longer_than_seq_len_refuses_training_before_the_run_dir(tmp_path):
    records = [conversation(i) for i in range(20)]
    records[4] = conversation(4, turns=4)
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    run_dir = tmp_path / "run"
    proc = run_cli(
        "train", str(CHAT_CONFIG), f"data.paths=[{path}]", f"data.cache_dir={tmp_path / 'cache'}", *CLI_CHAT,
        f"run_dir={run_dir}", "train.steps=1",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"data file {str(path)!r} line 5 gives " in proc.stderr and "data.overlong: truncate" in proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["moe.router={kind: expert_choice, top_k: 1}"], "expert_choice lets each expert choose among all the tokens"),
        (
            ["data.hub=some/dataset", "data.paths=[]"],
            "reads local JSON Lines files or a datasets folder (paths), not a",
        ),
        (["data.paths=[]"], "data.format 'chat' needs paths"),
    ],
)
def test_config_refusals(overrides, message):
    proc = run_cli("validate", str(CHAT_CONFIG), *overrides)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_tokenizer_without_a_template_is_refused_before_anything_is_written(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(5)])
    proc = run_cli(
        "prepare",
        str(CHAT_CONFIG),
        f"data.paths=[{path}]",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.chat_template=null",
    )
    assert_refused(
        proc, tmp_path, "data.chat_template: the tokenizer 'byte' has no chat template; set data.chat_template"
    )


EOS_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def test_a_mixture_of_chat_and_text_trains_one_bpe_and_prepares_both(tmp_path):
    """A trained BPE learns from the chat source's message texts too; the chat store renders with the BPE
    (its <|endoftext|>, id 0, is the template's eos_token, here after each answer); the text source stays a
    store of documents."""
    chat = write_jsonl(tmp_path / "chat.jsonl", [conversation(i) for i in range(30)])
    text = tmp_path / "prose.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    cfg = data.DataConfig(
        sources=[{"name": "chat", "paths": [str(chat)], "format": "chat", "weight": 1},
                 {"name": "prose", "paths": [str(text)], "weight": 1}],
        tokenizer={"train": "bpe", "vocab_size": 300}, chat_template=EOS_TEMPLATE,
        seq_len=128, val_fraction=0.1, cache_dir=str(tmp_path / "cache"), num_workers=0,
    )  # fmt: skip
    lines = []
    prepared = data.prepare_data(cfg, log=lines.append)
    chat_store, text_store = prepared.stores
    assert chat_store.holds_samples and not text_store.holds_samples
    tokens, mask = split_samples(chat_store, "train")[0]
    assert tokens[-2] == 0 and mask[-2] == 1  # <|endoftext|> after the answer: a target
    from moetrain.data.bpe import training_texts

    assert any("answer 1.0" in t for t in training_texts(cfg, None))
    assert any(line.startswith("source 'chat': samples: train 27 samples") for line in lines)
