"""The `collabedit` command, driven as a user would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from collabedit.cli import app
from collabedit.defaults import DEFAULT_EDITOR
from collabedit.editors import get_editor, make_config
from collabedit.evaluate.metrics import evaluate_requests
from collabedit.requests import load_requests
from collabedit.world.store import load_world

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures" / "requests"


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_the_commands():
    result = run("--help")
    assert result.exit_code == 0
    for name in ("demo", "eval", "world", "requests"):
        assert name in result.output


def test_world_info_json_reports_recall():
    result = run("world", "info", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    shipped = load_world()
    # the recall recorded by the build, read back; the counts and the architecture are the
    # shipped world's own
    assert info["recall"] == shipped.build["recall"] and info["recall"] >= 0.99
    world = shipped.world
    assert (info["n_subjects"], info["n_relations"]) == (len(world.subjects), len(world.relations))
    assert info["n_facts"] == world.n_facts() == len(world.subjects) * len(world.relations)
    assert info["n_parameters"] == sum(p.numel() for p in shipped.model.parameters())
    arch = info["architecture"]
    train = shipped.build["train"]
    assert arch["model_type"] == shipped.model.config.model_type == "qwen2"
    assert (arch["local_layers"], arch["window_size"]) == (
        train["local_layers"], train["window_size"]
    )
    assert arch["n_inner"] == shipped.model.config.intermediate_size
    # world-v1 by its name: 400 subjects, attention of one token below its edited layer
    v1 = json.loads(run("world", "info", "--path", "world-v1", "--json").stdout)
    assert (v1["n_subjects"], v1["architecture"]["window_size"]) == (400, 1)


def test_world_requests_export_then_validate_then_eval(tmp_path):
    for fmt in ("mcf", "zsre", "jsonl"):
        path = tmp_path / f"reqs.{'jsonl' if fmt == 'jsonl' else 'json'}"
        result = run("world", "requests", "--path", "world-v1", "--n", 30, "--format", fmt,
                     "--seed", 1, "--out", path)
        assert result.exit_code == 0, result.output
        result = run("requests", "validate", path)
        assert result.exit_code == 0, result.output
        assert f"format {fmt}, 30 requests" in result.output
    out = tmp_path / "eval.json"
    result = run("eval", "--model", "world-v1", "--requests", tmp_path / "reqs.json", "--json", out)
    assert result.exit_code == 0, result.output
    metrics = json.loads(out.read_text())["metrics"]
    # zsRE-form requests have no target_true: only the zsRE family applies
    assert "ES" not in metrics
    # the command scores exactly what the library scores on the file it wrote ...
    shipped = load_world("world-v1")
    reqs = load_requests(tmp_path / "reqs.json")
    expected = evaluate_requests(shipped.model, shipped.tokenizer, reqs)
    for key in ("EA", "PA", "NA", "zsRE_Score"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-9)
    # ... and the unedited world does not know the new objects but keeps its neighbours
    assert metrics["EA"] < 10 and metrics["NA"] > 90


def test_validate_reports_file_record_and_field(tmp_path):
    records = json.loads((FIXTURES / "mcf_small.json").read_text())
    records[1]["requested_rewrite"]["prompt"] = "no placeholder here"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    result = run("requests", "validate", bad)
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "bad.json" in text and "record 1" in text and "requested_rewrite.prompt" in text


def test_world_requests_rejects_too_many(tmp_path):
    result = run("world", "requests", "--n", 10**6, "--out", tmp_path / "x.json")
    assert result.exit_code == 1
    assert not (tmp_path / "x.json").exists()


def test_demo_reads_the_editor_config_it_is_given(tmp_path):
    """--hparams and --set reach the editor's config before any edit: a missing file is named,
    a file whose layers the world lacks is refused with those layers (the shipped world has 7),
    an unknown field is refused by its name; a field set on the command line changes that field
    of the world's preset and no other."""
    out = tmp_path / "demo.json"
    missing = run("demo", "--hparams", tmp_path / "none.yaml", "--json", out)
    assert missing.exit_code == 1 and "none.yaml" in missing.output
    y = tmp_path / "memit.yaml"
    y.write_text("alg_name: MEMIT\nlayers: [40]\nmom2_update_weight: 12345\n")
    wrong = run("demo", "--hparams", y, "--json", out)
    assert wrong.exit_code == 1 and "40" in wrong.output
    unknown = run("demo", "--set", "no_such_field=1", "--json", out)
    assert unknown.exit_code == 1 and "no_such_field" in unknown.output
    assert not out.exists()
    ran = run("demo", "--world", "world-v1", "--clients", 2, "--edits-per-client", 1,
              "--no-fidelity", "--set", "mom2_update_weight=123.5", "--set", "v_num_grad_steps=10",
              "--json", out)  # fmt: skip
    assert ran.exit_code == 0, ran.output
    used = json.loads(out.read_text())["config"]["editor_config"]
    # what the demo runs without --set: the world's preset, filled from the model
    preset = make_config(get_editor(DEFAULT_EDITOR), load_world("world-v1").model)
    preset = preset.model_dump(mode="json")
    changed = {"mom2_update_weight": 123.5, "v_num_grad_steps": 10}
    assert used == preset | changed and all(preset[k] != v for k, v in changed.items())


def test_demo_collabedit_matches_global_and_baselines_do_not(tmp_path):
    """Table 1 on the default (realistic) world: CollabEdit equals Global-Edit; with three
    edited layers the sequential editor's one-shot merge is not Global-Edit, the layer-synchronous
    protocol is; Simple-Average's 1/4 of each shift moves no fact. At 20 edits every client's
    edits fit its layers, so Task-Arithmetic and TIES stay close to Global-Edit here; the gap
    the paper reports appears at scale (docs/benchmarks.md, 10 x 100). z runs 40 steps instead
    of the preset's 100, a quarter of the test's time (measured: Global ES / EA 90 / 80 at 40 steps,
    100 / 95 at 100; the bounds below are 60 and 62.5)."""
    out = tmp_path / "demo.json"
    result = run("demo", "--clients", 4, "--edits-per-client", 5, "--seed", 4,
                 "--set", "v_num_grad_steps=40", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    methods, fid = data["methods"], data["fidelity"]
    assert set(methods) == {"unedited", "global", "collabedit", "ties", "task-arithmetic",
                            "simple-average"}
    unedited, glob, collab = methods["unedited"], methods["global"], methods["collabedit"]
    assert unedited["ES"] < 10 and unedited["NS"] > 90
    assert glob["ES"] >= unedited["ES"] + 60 and glob["EA"] >= unedited["EA"] + 60
    for key in ("ES", "PS", "NS", "Score", "EA", "PA", "NA", "zsRE_Score", "RS", "zsRE_RS"):
        assert abs(collab[key] - glob[key]) <= 0.5, key
    # relation specificity is reported for both forms; unedited, the world knows every answer
    assert unedited["RS"] >= 99 and unedited["zsRE_RS"] >= 99
    assert "RS" in result.output
    assert methods["simple-average"]["Score"] <= collab["Score"] - 50
    # fidelity against Global-Edit: exact for the frozen editor and the layer-synchronous
    # protocol; the sequential editor's one-shot merge reads each client's later layers after
    # its own earlier ones were written, so it differs (the reason layer-sync exists)
    assert set(fid) == {"memit-frozen one-shot", "memit one-shot", "memit layer-sync"}
    assert fid["memit-frozen one-shot"] < 1e-6 and fid["memit layer-sync"] < 1e-6
    assert fid["memit one-shot"] > 1e-2


def test_demo_with_the_sequential_editor_shows_collabedit_layer_sync_equal_to_global(tmp_path):
    """With published (sequential) MEMIT over the default world's three layers, the demo adds
    CollabEdit under the layer-synchronous protocol after the one-shot merge; that row scores as
    Global-Edit (its deltas are Global-Edit's, up to float32 sums in another order). A 30-step z
    keeps it quick; the edits take (the bound below), so the equality is not that of two
    unedited models."""
    out = tmp_path / "demo.json"
    result = run("demo", "--editor", "memit", "--clients", 3, "--edits-per-client", 3,
                 "--no-fidelity", "--set", "v_num_grad_steps=30", "--json", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    methods = json.loads(out.read_text())["methods"]
    rows = list(methods)
    assert rows[rows.index("collabedit") + 1] == "collabedit layer-sync"
    assert "collabedit layer-sync" in result.output
    glob, synced = methods["global"], methods["collabedit layer-sync"]
    assert glob["ES"] >= methods["unedited"]["ES"] + 50
    for key in ("ES", "PS", "NS", "Score", "RS", "EA", "PA", "NA", "zsRE_Score", "zsRE_RS"):
        assert abs(synced[key] - glob[key]) <= 0.5, key


def test_memit_edits_take_on_the_world(tmp_path):
    """`collabedit edit` on the default world: MEMIT spreads the residual over layers 1-3 (with
    the statistics the world carries), the edits take, and neighbours and the edited subjects'
    other relations keep their answers."""
    reqs = tmp_path / "reqs.json"
    assert run("world", "requests", "--n", 20, "--out", reqs, "--seed", 3).exit_code == 0
    edited = tmp_path / "edited"
    assert run("edit", "--model", "world", "--requests", reqs, "--out", edited,
               "--json", tmp_path / "edit.json").exit_code == 0
    unmet = json.loads((tmp_path / "edit.json").read_text())["unmet_residual"]
    assert set(unmet) == {"1", "2", "3"}
    before = _eval_metrics(tmp_path, "world", reqs, "unedited")
    after = _eval_metrics(tmp_path, edited, reqs, "edited")
    print("memit-edit", json.dumps({"unedited": before, "edited": after, "unmet": unmet}))
    # the edit writes the new objects (unedited ES: 0 on these requests) and keeps neighbours
    # and the subjects' other relations (issue 17: RS >= 90)
    assert after["ES"] >= before["ES"] + 70 and after["PS"] >= before["PS"] + 50
    assert after["NS"] >= before["NS"] - 10 and after["RS"] >= 90


def _eval_metrics(tmp_path, model, reqs, name: str) -> dict:
    result = run("eval", "--model", model, "--requests", reqs, "--json", tmp_path / f"{name}.json")
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / f"{name}.json").read_text())["metrics"]


def test_stats_then_edit_then_eval(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLABEDIT_CACHE", str(tmp_path / "cache"))
    result = run("stats", "--model", "world-v1", "--layers", "0,1", "--samples", 3000,
                 "--json", tmp_path / "stats.json")
    assert result.exit_code == 0, result.output
    layers = json.loads((tmp_path / "stats.json").read_text())["layers"]
    assert set(layers) == {"0", "1"} and layers["1"]["count"] > 3000
    reqs = tmp_path / "reqs.json"
    assert run("world", "requests", "--path", "world-v1", "--n", 20, "--out", reqs,
               "--seed", 3).exit_code == 0
    hp = tmp_path / "memit.yaml"
    hp.write_text("layers: [0, 1]\nmom2_n_samples: 3000\n")
    edited = tmp_path / "edited"
    result = run("edit", "--model", "world-v1", "--requests", reqs, "--out", edited,
                 "--hparams", hp)
    assert result.exit_code == 0, result.output
    assert (edited / "model.safetensors").is_file() and (edited / "world.json").is_file()
    before = _eval_metrics(tmp_path, "world-v1", reqs, "unedited")
    after = _eval_metrics(tmp_path, edited, reqs, "edited")
    print("stats-edit", json.dumps({"unedited": before, "edited": after}))
    # layers 0 and 1 with the sequential editor: the edits take, neighbours stay
    assert after["ES"] >= before["ES"] + 60 and after["NS"] >= 90
    # `--delta` with the frozen editor writes a delta file (a short z: only the file is checked)
    delta = tmp_path / "d.safetensors"
    result = run("edit", "--model", "world-v1", "--requests", reqs, "--out", delta, "--delta",
                 "--hparams", hp, "--editor", "memit-frozen", "--set", "v_num_grad_steps=10")
    assert result.exit_code == 0, result.output
    assert delta.is_file()


def test_edit_rejects_bad_layers_before_writing(tmp_path):
    reqs = tmp_path / "reqs.json"
    assert run("world", "requests", "--path", "world-v1", "--n", 3, "--out", reqs).exit_code == 0
    result = run("edit", "--model", "world-v1", "--requests", reqs, "--out", tmp_path / "o",
                 "--layers", "1,99")
    assert result.exit_code == 1
    assert "out of range" in result.output
    assert not (tmp_path / "o").exists()


def test_edit_set_equals_the_same_field_in_a_hparams_file(tmp_path):
    """`edit --set F=V` writes the delta a hyper-parameter file with F: V writes, bit for bit,
    and a different delta than without it; a malformed or unknown field is refused by its text
    before anything is written."""
    from collabedit.deltas import load_deltas

    reqs = tmp_path / "reqs.json"
    assert run("world", "requests", "--path", "world-v1", "--n", 2, "--out", reqs).exit_code == 0
    hp = tmp_path / "memit.yaml"
    hp.write_text("v_num_grad_steps: 10\nmom2_update_weight: 500\n")
    base = ["edit", "--model", "world-v1", "--requests", reqs, "--delta"]
    quick = ["--set", "v_num_grad_steps=10"]
    outs = {name: tmp_path / f"{name}.safetensors" for name in ("set", "file", "preset")}
    for name, extra in (
        ("set", [*quick, "--set", "mom2_update_weight=500"]),
        ("file", ["--hparams", hp]),
        ("preset", quick),
    ):
        result = run(*base, "--out", outs[name], *extra)
        assert result.exit_code == 0, result.output
    by_set, by_file, by_preset = (load_deltas(outs[n])[0] for n in ("set", "file", "preset"))
    assert set(by_set) == set(by_file) == set(by_preset)
    for layer in by_set:
        assert torch.equal(by_set[layer], by_file[layer])
        assert not torch.allclose(by_set[layer], by_preset[layer], rtol=1e-3, atol=0)
    for bad in ("mom2_update_weight", "no_such_field=1"):
        refused = run(*base, "--out", tmp_path / "x.safetensors", "--set", bad)
        named = bad.split("=")[0]
        assert refused.exit_code == 1 and named in refused.output, refused.output
    assert not (tmp_path / "x.safetensors").exists()


def test_client_edit_then_server_merge_rounds(tmp_path):
    hp = tmp_path / "memit.yaml"
    # a short z: the test is about the files and the round state, not about edit quality
    hp.write_text("layers: [0, 1]\nmom2_n_samples: 3000\nv_num_grad_steps: 20\n")
    reqs = tmp_path / "all.jsonl"
    assert run("world", "requests", "--path", "world-v1", "--n", 12, "--format", "jsonl",
               "--out", reqs, "--seed", 5).exit_code == 0
    lines = reqs.read_text().splitlines()
    updates = []
    for i in range(2):
        part = tmp_path / f"c{i}.jsonl"
        part.write_text("\n".join(lines[6 * i : 6 * i + 6]) + "\n")
        upd = tmp_path / f"c{i}.safetensors"
        result = run("client", "edit", "--model", "world-v1", "--requests", part, "--out", upd,
                     "--client-id", f"c{i}", "--hparams", hp)
        assert result.exit_code == 0, result.output
        updates.append(upd)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not an update")
    state, merged = tmp_path / "state", tmp_path / "round1"
    result = run("server", "merge", "--model", "world-v1", "--updates", updates[0], "--updates",
                 updates[1], "--updates", junk, "--out", merged, "--state", state,
                 "--hparams", hp, "--json", tmp_path / "merge.json")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "merge.json").read_text())
    assert len(summary["accepted"]) == 2 and list(summary["rejected"]) == [str(junk)]
    assert summary["state"]["round"] == 1
    result = run("eval", "--model", merged, "--requests", reqs, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    # round 1 is based on the merged model: the unedited world is refused
    result = run("client", "edit", "--model", "world-v1", "--requests", reqs, "--out",
                 tmp_path / "late.safetensors", "--round-state", state, "--hparams", hp)
    assert result.exit_code == 1 and "not the global model of round 1" in result.output


def test_world_build_takes_the_mlp_width(tmp_path):
    out = tmp_path / "w"
    result = run("world", "build", "--subjects", 20, "--mlp-width", 48, "--max-epochs", 1,
                 "--out", out, "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 48
    build = json.loads((tmp_path / "b.json").read_text())
    assert build["train"]["n_inner"] == 48 and len(build["history"]) == 1
