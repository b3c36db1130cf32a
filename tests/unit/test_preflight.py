"""Issue 17 part B: every input is checked before `OUT` is created; one exact line per mistake; nothing on disk.

Each case runs the real command line (`run`, `distill`, `compare` or `eval`) on a tiny teacher and asserts
the exact message, exit status 2 and that `--out` was never created. docs/reliability.md lists the cases.
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hybridize.cli import main
from hybridize.testing.models import save_tiny_teacher

from conftest import TINY_TEXT as TEXT, base  # tests/conftest.py: the tiny corpus and config (fixture `files`)


def teacher_copy(tmp_path, name="t", **kwargs):
    return save_tiny_teacher(tmp_path / name, n_layer=kwargs.pop("n_layer", 4), **kwargs)


def edit_config(teacher, **changes):
    cfg = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**cfg, **changes}))


def pickle_only(teacher):
    torch.save(load_file(teacher / "model.safetensors"), teacher / "pytorch_model.bin")
    (teacher / "model.safetensors").unlink()


def run_cli(tmp_path, command, cfg, capsys):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()  # the progress bars of making the test's files
    code = main([command, str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet"])
    return code, capsys.readouterr().err


# -- teacher files ----------------------------------------------------------------------------------
def case_teacher_without_config(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    (t / "config.json").unlink()
    cfg["teacher"] = str(t)
    return f"teacher {str(t)!r} has no config.json; pass a model directory saved with save_pretrained"


def case_teacher_without_tokenizer(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (t / name).unlink()
    cfg["teacher"] = str(t)
    return (f"teacher {str(t)!r} has no tokenizer (no tokenizer.json, tokenizer_config.json, tokenizer.model or vocab.json); "
            "put the tokenizer files saved with this checkpoint in that directory")


def case_teacher_tokenizer_unloadable(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    (t / "tokenizer.json").write_text("{not json")
    cfg["teacher"] = str(t)
    return (f"teacher {str(t)!r}: its tokenizer cannot be loaded (JSONDecodeError: Expecting property name enclosed in double "
            "quotes: line 1 column 2 (char 1)); put the tokenizer files saved with this checkpoint there")


def case_config_declares_more_layers_than_weights(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    edit_config(t, num_hidden_layers=6)
    cfg["teacher"] = str(t)
    return (f"teacher {str(t)!r}: its config.json (num_hidden_layers=6) declares 18 tensor(s) that its safetensors weights do "
            "not hold, the first 'model.layers.4.self_attn.q_proj.weight'; transformers would initialise them randomly. Fix "
            "config.json to match the weights, or use the complete checkpoint")


def case_config_declares_fewer_layers_than_weights(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    edit_config(t, num_hidden_layers=2)
    cfg["teacher"] = str(t)
    return (f"teacher {str(t)!r}: its safetensors weights hold layer(s) [2, 3] beyond config.json's num_hidden_layers=2; "
            "transformers would drop them. Fix num_hidden_layers, or use the checkpoint it belongs to")


def case_config_shape_differs_from_weights(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    edit_config(t, intermediate_size=48)
    cfg["teacher"] = str(t)
    return (f"teacher {str(t)!r}: tensor 'model.layers.0.mlp.gate_proj.weight' is stored with shape [64, 32] but config.json "
            "gives [48, 32]; fix config.json to match the weights, or use the checkpoint it belongs to")


def case_truncated_safetensors(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    weights = t / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-100])
    cfg["teacher"] = str(t)
    return (f"teacher {str(t)!r}: weights file {str(weights)!r} ({size - 100} bytes) is truncated or damaged: its header "
            "describes 164992 bytes of tensor data but the file holds 164892; copy or download that file again")


def case_garbage_safetensors(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    (t / "model.safetensors").write_bytes(b"garbage!" * 100)
    cfg["teacher"] = str(t)
    return (f"teacher {str(t)!r}: weights file {str(t / 'model.safetensors')!r} (800 bytes) is not a safetensors file or is "
            "truncated (its header length is unreadable); copy or download that file again")


def case_pickle_only_teacher(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    pickle_only(t)
    cfg["teacher"] = str(t)
    return (f"teacher {str(t)!r} holds its weights only in pickle file(s) pytorch_model.bin; hybridize reads weights only from "
            "safetensors files. Convert the checkpoint once (from_pretrained(...).save_pretrained(dir, safe_serialization=True)) "
            "and pass that directory")


def case_teacher_weights_not_finite(cfg, tmp_path):
    t = teacher_copy(tmp_path)
    weights = load_file(t / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][0, :3] = torch.tensor([float("nan"), float("inf"), float("nan")])
    save_file(weights, t / "model.safetensors", metadata={"format": "pt"})
    cfg["teacher"] = str(t)
    return (f"teacher {str(t)!r}: its weights are not finite: tensor 'model.layers.1.mlp.up_proj.weight' holds 2 NaN and 1 "
            "inf value(s); the checkpoint is damaged or was saved from a diverged training run. Use a checkpoint with finite weights")


# -- layers ------------------------------------------------------------------------------------------
def case_min_gap_leaves_no_room(cfg, tmp_path):
    cfg["softmax_layers"] = 2
    cfg["selection"]["selector"] = {"name": "uniform", "min_gap": 4}
    return ("selector 'uniform' field 'min_gap' must leave room for K=2 softmax layers among 4 (min_gap=4 fits at most 1); "
            "got 4. Lower min_gap to at most 3 or K to at most 1")


def case_run_layer_list_out_of_range(cfg, tmp_path):
    cfg["softmax_layers"] = [1, 7]
    return ("run field 'softmax_layers' must hold layer indices 0 <= i < 4 (the teacher has 4 layers); got [1, 7] "
            "(out of range: [7])")


# -- data --------------------------------------------------------------------------------------------
def case_empty_txt(cfg, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cfg["data"]["train"] = str(tmp_path / "empty.txt")
    return f"data field 'train': {str(tmp_path / 'empty.txt')!r} is empty (no text at all); give a file with at least one document"


def case_unreadable_data(cfg, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    cfg["data"]["train"] = str(tmp_path / "latin1.txt")
    return (f"data field 'train': cannot read {str(tmp_path / 'latin1.txt')!r}: 'utf-8' codec can't decode byte 0xe9 in "
            "position 3: invalid continuation byte")


def case_jsonl_text_not_a_string(cfg, tmp_path):
    lines = [json.dumps({"text": TEXT}), "", json.dumps({"text": ["a", "list"]})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    cfg["data"]["train"] = str(tmp_path / "d.jsonl")
    return (f"data field 'train': {str(tmp_path / 'd.jsonl')!r} line 3 field 'text' must be a string; got ['a', 'list']. "
            "Fix that row, or set data.text_field to the column that holds the text")


def case_seq_len_above_teacher_positions(cfg, tmp_path):
    cfg["data"]["seq_len"] = 300
    return ("data field 'seq_len' must be <= the teacher's max_position_embeddings (256); got 300. Lower data.seq_len, or set "
            "data.allow_longer_than_teacher: true for a teacher that extrapolates (e.g. rope scaling)")


def case_perplexity_data_missing(cfg, tmp_path):
    cfg["evaluators"] = [{"name": "perplexity", "data": str(tmp_path / "nope.txt")}]
    return (f"evaluator 'perplexity': data field 'data': {str(tmp_path / 'nope.txt')!r} does not exist; give a file, a "
            "directory or a hub id")


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_run_refuses_before_writing(case, files, tmp_path, capsys):
    cfg = copy.deepcopy(base(files))
    expected = CASES[case](cfg, tmp_path)
    code, err = run_cli(tmp_path, "run", cfg, capsys)
    assert code == 2
    assert err == f"hybridize: error: {expected}\n"
    assert not (tmp_path / "out").exists()


# -- distill: explicit layer lists ----------------------------------------------------------------------
@pytest.mark.parametrize("layers, expected", [
    ([0, 1, 2, 3], "hybridize distill field 'softmax_layers' must leave at least one of the teacher's 4 layers linear; got "
                   "[0, 1, 2, 3] (every layer, i.e. the teacher itself). Drop a layer from the list"),
    ([0, 9], "hybridize distill field 'softmax_layers' must hold layer indices 0 <= i < 4 (the teacher has 4 layers); got "
             "[0, 9] (out of range: [9])"),
    ([1, 1], "hybridize distill field 'softmax_layers' must hold distinct layer indices 0 <= i < 4 (the teacher has 4 layers); "
             "got [1, 1] (repeated: [1])"),
    (2, "hybridize distill field 'softmax_layers' must be an explicit list of layer indices; got 2 (use `hybridize run` to "
        "select layers)"),
], ids=["all-layers", "out-of-range", "repeated", "not-a-list"])
def test_distill_refuses_bad_layer_lists_before_writing(layers, expected, files, tmp_path, capsys):
    cfg = {**base(files), "softmax_layers": layers}
    code, err = run_cli(tmp_path, "distill", cfg, capsys)
    assert (code, err) == (2, f"hybridize: error: {expected}\n")
    assert not (tmp_path / "out").exists()


def test_distill_refuses_a_pickle_only_teacher_before_writing(files, tmp_path, capsys):
    cfg = {**base(files), "softmax_layers": [1], "teacher": str(teacher_copy(tmp_path))}
    pickle_only(tmp_path / "t")
    code, err = run_cli(tmp_path, "distill", cfg, capsys)
    assert code == 2 and "holds its weights only in pickle file(s) pytorch_model.bin" in err
    assert not (tmp_path / "out").exists()


def test_longer_seq_len_with_explicit_opt_in_runs(files, tmp_path, capsys):
    cfg = {**base(files), "softmax_layers": [1], "data": {**base(files)["data"], "seq_len": 300, "allow_longer_than_teacher": True},
           "distill": {"stage1_tokens": 600, "stage2_tokens": 600, "batch_size": 2, "eval_blocks": 1}}
    code, err = run_cli(tmp_path, "distill", cfg, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "result.json").read_text())["data"]["seq_len"] == 300


# -- evaluators' static settings --------------------------------------------------------------------------
def test_misspelt_lm_eval_task_is_refused_before_writing(files, tmp_path, capsys):
    cfg = {**base(files), "evaluators": [{"name": "lm-eval", "tasks": ["niah_singel_1"], "max_seq_lengths": [64]}]}
    code, err = run_cli(tmp_path, "run", cfg, capsys)
    assert (code, err) == (2, "hybridize: error: evaluator 'lm-eval' field 'tasks': unknown lm-eval task 'niah_singel_1'. Did you "
                              "mean: niah_single_1, niah_single_3, niah_single_2? `python -m lm_eval ls tasks` lists them\n")
    assert not (tmp_path / "out").exists()


def test_ruler_length_too_short_for_the_tokenizer_is_refused_before_writing(files, tmp_path, capsys):
    cfg = {**base(files), "evaluators": [{"name": "lm-eval", "tasks": ["ruler_cwe"], "max_seq_lengths": [64]}]}
    code, err = run_cli(tmp_path, "run", cfg, capsys)
    assert code == 2
    assert re.fullmatch(r"hybridize: error: evaluator 'lm-eval' task ruler_cwe needs max_seq_lengths >= \d+ with this tokenizer "
                        r"\(10 listed words plus the example and 120 generated tokens\); got 64\. lm-eval would leave the answer "
                        r"empty and divide by zero: raise the length or drop ruler_cwe\n", err), err
    assert not (tmp_path / "out").exists()


# -- compare, eval, config path ------------------------------------------------------------------------------
def test_compare_checks_every_budget_before_writing(files, tmp_path, capsys):
    cfg = {**base(files), "compare": {"selectors": ["uniform", {"name": "random", "min_gap": 4}], "softmax_layers": [1, 2, 4]}}
    code, err = run_cli(tmp_path, "compare", cfg, capsys)
    assert (code, err) == (2, "hybridize: error: 2 configuration problems:\n"
                              "  - run field 'softmax_layers' must give 1 <= K < 4 (the teacher has 4 layers); got 4 (K = 4)\n"
                              "  - selector 'random' field 'min_gap' must leave room for K=2 softmax layers among 4 (min_gap=4 "
                              "fits at most 1); got 4. Lower min_gap to at most 3 or K to at most 1\n")
    assert not (tmp_path / "out").exists()


def test_eval_refuses_a_pickle_only_model_in_one_line(tmp_path, capsys):
    t = teacher_copy(tmp_path)
    pickle_only(t)
    capsys.readouterr()
    assert main(["eval", str(t), "--evaluator", "{name: perplexity, data: x.txt}", "--out", str(tmp_path / "ev")]) == 2
    assert capsys.readouterr().err == (
        f"hybridize: error: hybridize eval: model directory {str(t)!r} holds its weights only in pickle file(s) "
        "pytorch_model.bin; hybridize reads weights only from safetensors files. Convert the checkpoint once "
        "(from_pretrained(...).save_pretrained(dir, safe_serialization=True)) and pass that directory\n")
    assert not (tmp_path / "ev").exists()


def test_eval_refuses_a_truncated_model_naming_the_file(tmp_path, capsys):
    t = teacher_copy(tmp_path)
    (t / "model.safetensors").write_bytes((t / "model.safetensors").read_bytes()[:1000])
    capsys.readouterr()
    assert main(["eval", str(t), "--evaluator", "{name: perplexity, data: x.txt}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybridize: error: hybridize eval: model directory {str(t)!r}: weights file "
                          f"{str(t / 'model.safetensors')!r} (1000 bytes) is ") and err.endswith("copy or download that file again\n")


@pytest.mark.parametrize("command", ["run", "distill", "compare"])
def test_a_config_path_that_is_a_directory_says_so(command, tmp_path, capsys):
    assert main([command, str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"hybridize: error: config file {str(tmp_path)!r} is a directory; give the path of a YAML "
                                       "run config file\n")
