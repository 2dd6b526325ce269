"""`fused-objectives probe` end to end on a tiny local model: JSON Lines and saved datasets, JSON and
PNG outputs, and every bad-data case failing with a message that names the line or field."""
import json
import os
import sys

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import make_tiny  # noqa: E402

import fused_objectives  # noqa: E402,F401

P = sys.modules["fused_objectives.probe"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_cli")
    model_dir, data = make_tiny.make_all(str(out), n=10)
    return str(out), model_dir, data


def _probe(capsys, *argv):
    rc = P.main(["--no-progress", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_cli_jsonl_json_and_plot(tiny, tmp_path, capsys):
    _, model_dir, data = tiny
    js, png = tmp_path / "probe.json", tmp_path / "probe.png"
    rc, out, err = _probe(capsys, "--model", model_dir, "--data", data, "--batch-size", "4",
                          "--json", str(js), "--plot", str(png))
    assert rc == 0, err
    assert "HEURISTIC" in out and "mean p" in out
    result = json.loads(js.read_text())
    for key in ("mean_p", "mean_logp", "percentiles", "frac_below_0_2", "tokens", "recommendation", "histogram",
                "continuum", "examples", "truncated"):
        assert key in result
    assert result["examples"] == 10
    assert set(result["percentiles"]) == {"5", "10", "25", "50", "75", "90"}
    assert result["recommendation"]["heuristic"] is True
    assert "cut_points" in result["recommendation"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_same_numbers_as_api(tiny, tmp_path, capsys):
    """The CLI path (tokenize, batch, probe) agrees with the API on the same data and max length."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, model_dir, data = tiny
    js = tmp_path / "p.json"
    rc, _, err = _probe(capsys, "--model", model_dir, "--data", data, "--limit", "6", "--max-length", "20",
                        "--json", str(js))
    assert rc == 0, err
    got = json.loads(js.read_text())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = P.encode_records(tok, P.load_records(data, limit=6), max_length=20)
    res = fused_objectives.probe(model, P.make_batches(enc, 1, tok.pad_token_id))
    assert got["tokens"] == res.tokens
    assert got["mean_p"] == pytest.approx(res.mean_p, rel=1e-5)
    assert got["examples"] == 6 and got["truncated"] == sum(e.truncated for e in enc) > 0


def test_cli_messages_field_and_saved_dataset(tiny, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    _, model_dir, _ = tiny
    recs = make_tiny.make_records(5)
    path = str(tmp_path / "ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(path)
    js = tmp_path / "m.json"
    rc, out, err = _probe(capsys, "--model", model_dir, "--data", path, "--messages-field", "messages",
                          "--json", str(js))
    assert rc == 0, err
    assert json.loads(js.read_text())["mode"] == "messages"
    # a flat saved Dataset works too, with the prompt/response fields
    flat = str(tmp_path / "flat")
    datasets.Dataset.from_list(recs).save_to_disk(flat)
    rc, out, err = _probe(capsys, "--model", model_dir, "--data", flat)
    assert rc == 0, err


BAD_JSONL = [
    ("missing-field", '{"prompt": "a"}\n', "line 1: missing field 'response'"),
    ("missing-field-line-2", '{"prompt": "a", "response": "b"}\n{"prompt": "a", "answer": "b"}\n',
     "line 2: missing field 'response'"),
    ("empty-response", '{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": "  "}\n',
     "line 3: field 'response' is empty"),
    ("response-not-string", '{"prompt": "a", "response": 3}\n', "line 1: field 'response' must be a string"),
    ("json-array", '[{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]\n',
     "line 1 holds a JSON list"),
    ("pretty-printed", '{\n  "prompt": "a",\n  "response": "b"\n}\n', "line 1 is not valid JSON"),
    ("csv", "prompt,response\nhi,there\n", "line 1 is not valid JSON"),
    ("empty-file", "", "no records"),
]


@pytest.mark.parametrize("content, message", [(c, m) for _, c, m in BAD_JSONL], ids=[i for i, _, _ in BAD_JSONL])
def test_cli_bad_jsonl(tiny, tmp_path, capsys, content, message):
    _, model_dir, _ = tiny
    path = _write(tmp_path / "bad.jsonl", content)
    rc, out, err = _probe(capsys, "--model", model_dir, "--data", path)
    assert rc == 2
    assert message in err, err
    assert "bad.jsonl" in err


BAD_MESSAGES = [
    ("not-a-list", {"messages": "hello"}, "field 'messages' must be a non-empty list"),
    ("empty-list", {"messages": []}, "field 'messages' must be a non-empty list"),
    ("no-assistant", {"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    ("no-content", {"messages": [{"role": "user"}]}, "messages[0] must be an object with 'role' and 'content'"),
    ("empty-assistant", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
     "messages[1] is an assistant turn with empty content"),
    ("missing-field", {"prompt": "a", "response": "b"}, "missing field 'messages'"),
]


@pytest.mark.parametrize("record, message", [(r, m) for _, r, m in BAD_MESSAGES], ids=[i for i, _, _ in BAD_MESSAGES])
def test_cli_bad_messages(tiny, tmp_path, capsys, record, message):
    _, model_dir, _ = tiny
    good = make_tiny.make_records(1)[0]
    path = _write(tmp_path / "bad.jsonl", json.dumps(good) + "\n" + json.dumps(record) + "\n")
    rc, out, err = _probe(capsys, "--model", model_dir, "--data", path, "--messages-field", "messages")
    assert rc == 2
    assert "line 2" in err and message in err, err


def test_cli_bad_dataset_row_and_split(tiny, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    _, model_dir, _ = tiny
    path = str(tmp_path / "ds")
    datasets.DatasetDict({"a": datasets.Dataset.from_list([{"prompt": "x", "answer": "y"}]),
                          "b": datasets.Dataset.from_list([{"prompt": "x", "answer": "y"}])}).save_to_disk(path)
    rc, _, err = _probe(capsys, "--model", model_dir, "--data", path)
    assert rc == 2 and "splits ['a', 'b']" in err and "--split" in err
    rc, _, err = _probe(capsys, "--model", model_dir, "--data", path, "--split", "a")
    assert rc == 2 and "[a]: row 0: missing field 'response'" in err, err
    rc, _, err = _probe(capsys, "--model", model_dir, "--data", path, "--split", "a", "--response-field", "answer")
    assert rc == 0, err


def test_cli_model_without_tokenizer(tiny, tmp_path, capsys):
    _, _, data = tiny
    tok = make_tiny.make_tokenizer()
    bare = str(tmp_path / "bare")
    make_tiny.make_model(tok).save_pretrained(bare)
    rc, _, err = _probe(capsys, "--model", bare, "--data", data)
    assert rc == 2
    assert "could not load a tokenizer" in err and "--tokenizer" in err, err


def test_cli_other_errors(tiny, tmp_path, capsys):
    root, model_dir, data = tiny
    rc, _, err = _probe(capsys, "--model", model_dir, "--data", str(tmp_path / "nope.jsonl"))
    assert rc == 2 and "does not exist" in err
    rc, _, err = _probe(capsys, "--model", model_dir, "--data", root)  # a directory, not a saved dataset
    assert rc == 2 and "not a dataset saved with datasets.save_to_disk" in err, err
    rc, _, err = _probe(capsys, "--model", model_dir, "--data", data, "--batch-size", "0")
    assert rc == 2 and "--batch-size must be >= 1" in err
    rc, _, err = _probe(capsys, "--model", str(tmp_path / "no_model"), "--data", data)
    assert rc == 2 and "--model" in err and "no_model" in err and "no such directory" in err, err
    (tmp_path / "empty_model").mkdir()
    rc, _, err = _probe(capsys, "--model", str(tmp_path / "empty_model"), "--data", data)
    assert rc == 2 and "could not load a tokenizer" in err, err
    # a tokenizer without a chat template cannot render --messages-field
    tok = make_tiny.make_tokenizer()
    tok.chat_template = None
    plain = str(tmp_path / "plain_tok")
    tok.save_pretrained(plain)
    rc, _, err = _probe(capsys, "--model", model_dir, "--tokenizer", plain, "--data", data,
                        "--messages-field", "messages")
    assert rc == 2 and "needs a tokenizer with a chat template" in err, err
    # every response truncated away
    rc, _, err = _probe(capsys, "--model", model_dir, "--data", data, "--max-length", "3")
    assert rc == 2 and "no tokens were scored" in err, err


def test_console_command_wiring(tiny, capsys):
    """`fused-objectives probe` goes through fused_objectives/cli.py."""
    from fused_objectives import cli

    _, model_dir, data = tiny
    rc = cli.main(["probe", "--model", model_dir, "--data", data, "--limit", "2", "--no-progress"])
    assert rc in (0, None)
    assert "HEURISTIC" in capsys.readouterr().out
