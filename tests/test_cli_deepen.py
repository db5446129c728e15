"""ressurgeon deepen on the command line: model files and Hugging Face checkpoint folders."""

import hashlib
import json

import pytest
import torch
from helpers import one_line_error, run_cli as run

from models import ViTLike, tiny_llama_lm


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def vit_pt2(tmp_path_factory):
    torch.manual_seed(0)
    model = ViTLike(depth=4).eval()
    x = torch.randn(2, 3, 16, 16)
    path = tmp_path_factory.mktemp("vit") / "vit.pt2"
    torch.export.save(torch.export.export(model, (x,)), path)
    return path


def test_help_shows_examples_and_the_config_fields():
    result = run("deepen", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "Examples:" in text and "ressurgeon deepen vit.pt2 --blocks 4" in text
    assert "LLaMA Pro" in text and "--where" in text and "--how" in text


def test_deepen_writes_a_pt2_that_computes_what_the_original_did(example_models, tmp_path):
    before = digest(example_models["vgg"])
    out = tmp_path / "deeper.pt2"
    result = run("deepen", example_models["vgg"], "--blocks", "2", "-o", out)
    assert result.exit_code == 0, result.output
    assert "New blocks (new)" in result.stdout and "outputs unchanged" in result.stderr
    deeper = torch.export.load(out).module()
    original = torch.export.load(example_models["vgg"]).module()
    x = torch.randn(3, 3, 32, 32)   # the archive keeps a dynamic batch
    assert torch.equal(deeper(x), original(x))
    assert digest(example_models["vgg"]) == before   # the input is never touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deeper.pt2"]   # no temp files left


def test_json_report_and_fold_of_the_result(vit_pt2, tmp_path):
    out = tmp_path / "d.pt2"
    result = run("deepen", vit_pt2, "-n", "2", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["how"] == "copy" and report["new_blocks"] == ["deepen_blocks_1",
                                                                "deepen_blocks_3"]
    assert report["parity"]["max_abs_diff"] == 0 and report["output"].endswith("d.pt2")
    assert {r["reason"] for r in report["rejected"]} == {"spread"}
    assert report["params_added"] == sum(b["params"] for b in report["blocks"]) > 0
    folded = run("fold", out, "-o", tmp_path / "f.pt2", "--json")
    assert folded.exit_code == 0, folded.output
    assert len(json.loads(folded.stdout)["branches_removed"]) == 4   # attn.proj, fc2 of each


def test_dry_run_writes_only_the_plan_and_the_plan_applies(vit_pt2, tmp_path):
    plan = tmp_path / "plan.json"
    result = run("deepen", vit_pt2, "--where", "blocks.0", "--dry-run", "--plan-out", plan,
                 "--onnx", tmp_path / "x.onnx")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    data = json.loads(plan.read_text())
    assert data["blocks"] == [{"after": "blocks.0", "how": "copy"}]
    data["blocks"].append({"after": "blocks.2", "how": "copy"})
    plan.write_text(json.dumps(data))
    result = run("deepen", vit_pt2, "--plan", plan, "-o", tmp_path / "p.pt2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["new_blocks"] == ["deepen_blocks_0", "deepen_blocks_2"]


@pytest.mark.parametrize("args, message", [
    ([], "--blocks N"),
    (["--blocks", "0"], "blocks must be an integer >= 1"),
    (["--blocks", "9"], "blocks=9 but only 4 position"),
    (["--blocks", "1", "--how", "wider"], "how must be one of"),
    (["--blocks", "1", "--how", "copy", "--where", "head"], "no position matches"),
    (["--blocks", "1", "-o", "out.onnx"], "cannot tell the format"),
])
def test_bad_input_is_one_line_and_exit_2(vit_pt2, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(run("deepen", vit_pt2, *args))
    assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # nothing written


def test_the_input_is_never_the_output(vit_pt2):
    before = digest(vit_pt2)
    assert "never overwrites its input" in one_line_error(
        run("deepen", vit_pt2, "-n", "1", "-o", vit_pt2))
    assert digest(vit_pt2) == before


def test_a_failing_onnx_check_exits_3_and_leaves_no_model(vit_pt2, tmp_path, monkeypatch):
    import ressurgeon
    from ressurgeon import onnx_export
    from ressurgeon.errors import VerificationError

    def failing(*args, **kwargs):
        raise VerificationError("ONNX Runtime disagrees")

    monkeypatch.setattr(onnx_export, "export_onnx", failing)
    monkeypatch.setattr(ressurgeon, "export_onnx", failing, raising=False)  # the CLI's import
    result = run("deepen", vit_pt2, "-n", "1", "-o", tmp_path / "d.pt2",
                 "--onnx", tmp_path / "d.onnx")
    one_line_error(result, code=3)
    assert list(tmp_path.iterdir()) == []


# -- checkpoint folders ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    tiny_llama_lm().save_pretrained(folder)
    return transformers, folder


def test_a_checkpoint_folder_is_expanded_and_checked_with_transformers(llama_folder, tmp_path):
    transformers, src = llama_folder
    before = {p.name: digest(p) for p in src.iterdir()}
    result = run("deepen", src, "--where", "1", "--where", "model.layers.3",
                 "-o", tmp_path / "pro", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoint"]["new_layers"] == [2, 5]
    assert report["checkpoint"]["copied_from"] == [1, 3]
    assert report["parity"]["max_abs_diff"] == 0
    deeper = transformers.AutoModel.from_pretrained(tmp_path / "pro")
    assert deeper.config.num_hidden_layers == 6
    assert {p.name: digest(p) for p in src.iterdir()} == before


def test_a_checkpoint_folder_dry_run_and_errors(llama_folder, tmp_path):
    _, src = llama_folder
    result = run("deepen", src, "-n", "2", "-o", tmp_path / "pro", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "4 -> 6" in result.stdout and not (tmp_path / "pro").exists()
    assert "inside the source" in one_line_error(run("deepen", src, "-n", "1",
                                                     "-o", src / "sub"))
    assert "model files" in one_line_error(run("deepen", src, "-n", "1", "--plan-out",
                                               tmp_path / "p.json"))
    assert "copies of its layers" in one_line_error(run("deepen", src, "-n", "1",
                                                        "--how", "new"))
