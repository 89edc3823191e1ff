"""The command line: every command documents itself; errors are one clear line, not a trace."""

import subprocess
import sys

import pytest

from conftest import run_files

from diffmine.cli import main, parser

COMMANDS = ["synth", "prepare", "train", "typicality", "mine", "cluster", "report", "evaluate", "run", "demo", "status", "query",
            "export", "relocate", "clean"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--run" in out or "--out" in out


def test_every_flag_of_every_command_has_help_text():
    import argparse

    def missing(p, name="diffmine"):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    yield from missing(subparser, f"{name} {sub}")
            elif not (action.help or "").strip() or action.help.startswith("(default"):
                yield f"{name} {'/'.join(action.option_strings) or action.dest}"

    assert list(missing(parser())) == []


def test_a_field_shared_by_steps_is_helped_with_each_steps_own_meaning():
    """--batch-size is training's images per step, typicality's UNet inputs per pass (0: the
    backend's choice) and the features' images per pass: one text offered training the 0 it refuses."""
    import dataclasses

    from diffmine.features import FeatureConfig
    from diffmine.train import TrainConfig
    from diffmine.typicality import TypicalityConfig

    def help_of(command, flag):
        sub = next(a for a in parser()._actions if a.dest == "command").choices[command]
        return next(a.help for a in sub._actions if flag in a.option_strings)

    assert "0:" in help_of("typicality", "--batch-size") and "0:" in help_of("run", "--typicality-batch-size")
    for command, flag, config in (("train", "--batch-size", TrainConfig()), ("run", "--batch-size", TrainConfig()),
                                  ("cluster", "--feature-batch-size", FeatureConfig())):
        assert "0:" not in help_of(command, flag) and "UNet inputs" not in help_of(command, flag)
        with pytest.raises(ValueError):
            dataclasses.replace(config, batch_size=0)
    assert dataclasses.replace(TypicalityConfig(), batch_size=0).batch_size == 0


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"diffmine {version('diffmine')}"


def test_run_accepts_the_options_of_the_steps_it_chains():
    args = parser().parse_args(["run", "--data", "d", "--run", "r", "--steps", "5", "--samples", "3", "--seed", "4",
                                "--k", "7", "--patch", "9", "--typicality-batch-size", "64"])
    from diffmine.cli import build_config
    from diffmine.typicality import TypicalityConfig

    config = build_config(TypicalityConfig, args, "typicality-")
    assert (config.samples, config.seed, config.batch_size) == (3, 4, 64)
    assert (args.steps, args.k, args.patch) == (5, 7, 9)


def test_samples_default_to_16_and_to_the_adaptive_cap_64():
    """--samples not given: the fixed-draw estimators' 16, the adaptive estimator's cap 64 (its
    budget keeps the mean at 16); given, it is taken as it is."""
    from diffmine.cli import build_config
    from diffmine.typicality import TypicalityConfig

    def samples(*argv, prefix=""):
        return build_config(TypicalityConfig, parser().parse_args(list(argv)), prefix).samples

    assert samples("typicality", "--run", "r") == 16
    assert samples("typicality", "--run", "r", "--estimator", "adaptive") == 64
    assert samples("typicality", "--run", "r", "--estimator", "adaptive", "--samples", "32") == 32
    assert samples("run", "--data", "d", "--run", "r", "--estimator", "adaptive", prefix="typicality-") == 64
    assert samples("demo", "--run", "r", prefix="typicality-") == 16
    assert samples("classify", "--run", "r") == 16


def test_missing_dataset_is_one_clear_line(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nowhere"), "--run", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nowhere: no such dataset folder or manifest" in err and "Traceback" not in err


def test_step_before_training_says_what_to_run(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(["mine", "--run", str(tmp_path / "run")]) == 2
    assert "diffmine typicality" in capsys.readouterr().err


def test_an_error_line_shows_untrusted_text_escaped(tmp_path, capsys):
    """A path (or label) in the one error line cannot send the terminal control sequences."""
    run = tmp_path / "run\x1b]0;owned\x07"
    assert main(["export", "--run", str(run), "--format", "csv", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "run\\x1b]0;owned\\x07" in err


def test_output_cut_short_by_the_reader_is_no_error(tmp_path):
    """`diffmine query ... | head -1`: the reader closes the pipe; no "error: Broken pipe" line."""
    from diffmine.pipeline import prepare
    from diffmine.rundir import Run
    from diffmine.synthetic import SynthConfig, generate

    data = generate(tmp_path / "data", SynthConfig(labels=2, per_label=4, size=16), progress=False)
    prepare(Run(tmp_path / "run"), data, "A scene from {label}.", "A scene.", 16)
    query = "SELECT * FROM images AS a, images AS b, images AS c, images AS d"  # 4,096 rows: more than a pipe holds
    reader = subprocess.Popen(["head", "-1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    result = subprocess.run([sys.executable, "-m", "diffmine", "query", "--run", str(tmp_path / "run"), query],
                            stdout=reader.stdin, stderr=subprocess.PIPE, text=True, timeout=120)
    reader.stdin.close()
    reader.wait(timeout=60)
    assert result.returncode == 1 and result.stderr == ""


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "diffmine", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "typicality" in out.stdout


def test_cli_end_to_end_on_the_built_in_data(tmp_path, capsys):
    """`diffmine synth`, `run`, `evaluate --json`, `status`, `query` wired together (few steps)."""
    import json

    assert main(["synth", "--out", str(tmp_path / "d"), "--labels", "2", "--per-label", "4", "--size", "32"]) == 0
    assert main(["run", "--data", str(tmp_path / "d" / "images"), "--run", str(tmp_path / "r"), "--resolution", "32",
                 "--steps", "2", "--batch-size", "4", "--samples", "2", "--k", "2", "--top", "4"]) == 0
    assert (tmp_path / "r" / "report" / "index.html").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tmp_path / "r"), "--masks", str(tmp_path / "d" / "masks"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["per_label"]) == {"norland", "sudland"} and 0 <= result["overall"]["auc_pr"] <= 1
    assert main(["query", "--run", str(tmp_path / "r"), "SELECT count(*) AS n FROM images"]) == 0
    assert "8" in capsys.readouterr().out


FIXED = "'paper', 'stratified', 'stratified-antithetic')"


@pytest.mark.parametrize("argv, choices", [
    (["classify", "--run", "r", "--estimator", "adaptive"], FIXED),
    (["contrast", "--run", "r", "a", "b", "--estimator", "adaptive"], FIXED),
    (["run", "--data", "d", "--run", "r", "--estimator", "adaptivee"], "'stratified-antithetic', 'adaptive')"),
    (["typicality", "--run", "r", "--precision", "bf61"], "'auto', 'fp32', 'bf16', 'fp16')"),
    (["translate", "--run", "r", "--method", "pix2pix"], "'pnp', 'sdedit')"),
    # refused inside accelerate only after train had recorded it: the next valid value then needed --force
    (["train", "--data", "d", "--run", "r", "--mixed-precision", "foo"], "'no', 'bf16', 'fp16')"),
    (["run", "--data", "d", "--run", "r", "--lr-schedule", "cosin"], "'constant', 'cosine', 'linear')")])
def test_a_value_a_step_does_not_take_is_refused_by_the_parser_naming_the_choices(argv, choices, capsys):
    """classify and contrast draw a fixed K per image: no adaptive estimator (their configs refuse
    it too, but the parser says so first, with the values that are taken)."""
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "invalid choice" in err and choices in err


def test_the_parser_takes_every_estimator_where_the_step_does():
    assert parser().parse_args(["typicality", "--run", "r", "--estimator", "adaptive"]).estimator == "adaptive"
    assert parser().parse_args(["classify", "--run", "r", "--estimator", "paper"]).estimator == "paper"


# ----------------------------------------------------------------------------------------------
# flags at their boundaries: one clear line (exit 2), and the run left as it was


def _copied(run, tmp_path):
    """A copy of the session's tiny run (a refusal under test must not spoil it for the other tests)."""
    import shutil

    return shutil.copytree(run.path, tmp_path / "run")


def _refused(argv, capsys, *names):
    """Run ``argv``: exit 2, one line naming each of ``names``, no traceback; returns the line."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # the parser's refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if " error: " in line]  # progress bars aside
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(name in lines[0] for name in names), err
    return lines[0]


@pytest.mark.parametrize("argv", [["mine", "--patch", "33"],
                                  ["contrast", "norland", "sudland", "--samples", "2", "--patch", "33"]])
def test_a_patch_larger_than_the_images_is_refused_leaving_the_run(argv, tiny_run, tmp_path, capsys):
    """It said "No objects to concatenate", after dropping the mined patches' record (contrast:
    after computing the maps)."""
    run = _copied(tiny_run, tmp_path)
    before = run_files(run)
    _refused([argv[0], "--run", str(run), *argv[1:]], capsys, "--patch 33", "32 px")
    assert run_files(run) == before


@pytest.mark.parametrize("to", ["bogus", "norland,norland", ","])
def test_translate_refuses_an_unknown_repeated_or_empty_to_before_recording_it(to, tiny_run, tmp_path, capsys):
    """An unknown label was refused only after an incomplete translate record naming it was
    written (the next translate then asked for --force); a repeated one or none was taken."""
    run = _copied(tiny_run, tmp_path)
    before = run_files(run)
    _refused(["translate", "--run", str(run), "--images", "1", "--steps", "2", "--to", to], capsys, repr(to) if to != "bogus" else "bogus")
    assert run_files(run) == before


@pytest.mark.parametrize("flags, named", [(["--feature-block", "99"], "no such residual block"),
                                          (["--feature-resnet", "5"], "no such residual block"),
                                          (["--attention-blocks", "7,9"], "no self-attention layer"),
                                          (["--attention-blocks", "1,x"], "attention_blocks")])
def test_translate_refuses_an_injection_the_model_cannot_take(flags, named, tiny_run, tmp_path, capsys):
    """Plug-and-Play into a block the model lacks injected nothing, silently (the translations kept
    no structure of their source), after recording the translations as begun."""
    run = _copied(tiny_run, tmp_path)
    before = run_files(run)
    _refused(["translate", "--run", str(run), "--images", "1", "--steps", "2", *flags], capsys, named)
    assert run_files(run) == before


@pytest.mark.parametrize("flag, value", [("--images", "-1"), ("--guidance", "nan"), ("--batch-size", "0")])
def test_translate_refuses_nonsense_numbers(flag, value, tiny_run, tmp_path, capsys):
    _refused(["translate", "--run", str(_copied(tiny_run, tmp_path)), flag, value], capsys, flag[2:].replace("-", "_"))


@pytest.mark.parametrize("flag, value", [("--feature-t", "nan"), ("--feature-t", "-0.1"), ("--feature-t", "1.5"),
                                         ("--feature-ensemble", "0"), ("--feature-batch-size", "0"),
                                         ("--feature-batch-size", "-1"), ("--feature-block", "-1"),
                                         ("--feature-block", "99")])
def test_cluster_refuses_feature_flags_out_of_range_leaving_the_run(flag, value, tiny_run, tmp_path, capsys):
    """Tracebacks (ensemble 0, block 99), "range() arg 3 must not be zero", "cannot convert float
    NaN to integer", an empty features.npy (batch size -1), each after the features' and clusters'
    records were dropped; t outside [0, 1] was taken (a negative t indexed the schedule from its end)."""
    run = _copied(tiny_run, tmp_path)
    before = run_files(run)
    _refused(["cluster", "--run", str(run), flag, value], capsys, flag)
    assert run_files(run) == before


def test_trends_refuses_a_min_size_no_cluster_reaches_keeping_the_stored_trends(tiny_run, tmp_path, capsys):
    """The refusal came after the stored trends' record was dropped."""
    run = _copied(tiny_run, tmp_path)
    labels = ",".join(sorted(tiny_run.labels))
    assert main(["trends", "--run", str(run), "--order", labels, "--min-size", "2"]) == 0
    before = run_files(run)
    _refused(["trends", "--run", str(run), "--order", labels, "--min-size", "100000"], capsys, "--min-size")
    assert run_files(run) == before


def test_trends_refuses_a_stride_above_the_patch_keeping_the_stored_trends(tiny_run, tmp_path, capsys):
    """A grid step wider than the patch was taken: its boxes left the pixels between them unscored."""
    import numpy as np

    from diffmine.trends import candidate_boxes

    def covered(k, stride):
        seen = np.zeros((32, 32), bool)
        for x0, y0, x1, y1 in candidate_boxes(32, 32, k, stride):
            seen[y0:y1, x0:x1] = True
        return seen.all()

    k = int(tiny_run.lineage.get("mine")["patch"])
    assert covered(k, k) and not covered(k, k + 1)
    run = _copied(tiny_run, tmp_path)
    labels = ",".join(sorted(tiny_run.labels))
    assert main(["trends", "--run", str(run), "--order", labels, "--min-size", "2", "--stride", str(k)]) == 0
    before = run_files(run)
    _refused(["trends", "--run", str(run), "--order", labels, "--min-size", "2", "--stride", str(k + 1)], capsys,
             f"--stride {k + 1} is larger than the patch ({k} px", f"--stride {k} or less")
    assert run_files(run) == before


@pytest.mark.parametrize("sql", ["", "  ", "-- a comment"])
def test_query_without_a_statement_is_one_clear_line(sql, tiny_run, capsys):
    """It was a traceback (AttributeError: 'NoneType' object has no attribute 'df')."""
    _refused(["query", "--run", str(tiny_run.path), sql], capsys, "no SQL statement")


@pytest.mark.parametrize("argv, named", [
    (["mine", "--z-min", "nan"], "z_min"),  # kept no patch, stored as done
    (["mine", "--z-min=-inf"], "z_min"),
    (["typicality", "--estimator", "adaptive", "--samples", "4", "--adaptive-bound", "nan"], "NaN"),
    (["typicality", "--estimator", "adaptive", "--samples", "4", "--adaptive-z-min", "inf"], "z_min"),
    (["cluster", "--merge", "nan"], "merge"),
    (["cluster", "--min-size", "-1"], "min_size"),
    (["classify", "--per-label", "-1"], "per_label"),
    (["cotypicality", "--k", "0"], "k"),
    (["localize", "--masks", "MASKS", "--blur", "nan"], "blur"),
    (["report", "--clusters", "-1"], "clusters"),  # each was taken, and the report rendered with it
    (["report", "--per-cluster", "0"], "per_cluster"),
    (["report", "--examples", "-1"], "examples"),
    (["report", "--context", "nan"], "context"),
    (["report", "--view-px", "0"], "view_px"),
    (["train", "--ema-decay", "1"], "ema_decay"),  # an EMA that never moves: the untrained weights
    (["train", "--grad-clip", "nan"], "grad_clip"),
    (["train", "--grad-clip", "0"], "grad_clip"),
    (["train", "--learning-rate", "0"], "learning_rate"),
    (["train", "--warmup-steps", "-1"], "warmup_steps"),
    (["train", "--random-crop", "1"], "random_crop"),
])
def test_a_setting_out_of_range_is_refused_in_one_line_leaving_the_run(argv, named, tiny_run, tmp_path, capsys):
    run = _copied(tiny_run, tmp_path)
    before = run_files(run)
    extra = ["--data", str(tiny_run.dataset_root), "--resolution", "32", "--prompt", "A scene from {label}.",
             "--null-prompt", "A scene."] if argv[0] == "train" else []
    argv = [str(tiny_run.dataset_root.parent / "masks") if a == "MASKS" else a for a in argv]
    _refused([argv[0], "--run", str(run), *extra, *argv[1:]], capsys, named)
    assert run_files(run) == before


@pytest.mark.parametrize("argv, named", [
    (["--per-label", "0"], "per_label"),  # an empty dataset, "written"
    (["--distractors", "-1"], "distractors"),
    (["--size", "0"], "size"),  # "high - low < 0"
    (["--size", "32", "--element-scale", "100"], "element_scale"),  # "high - low < 0"
    (["--element-scale", "0"], "element_scale"),  # no element planted
])
def test_synth_refuses_a_dataset_it_cannot_draw(argv, named, tmp_path, capsys):
    _refused(["synth", "--out", str(tmp_path / "data"), "--labels", "2", *argv], capsys, named)
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("argv, named", [(["--resolution", "30"], "--resolution 30"),  # a traceback from pixel_unshuffle
                                         (["--lora-rank", "4"], "--lora-rank"),  # a traceback (TinyConfig's TypeError)
                                         (["--text-encoder", "x"], "--text-encoder")])
def test_train_refuses_what_the_embedded_model_cannot_take_before_listing(argv, named, tiny_run, tmp_path, capsys):
    _refused(["train", "--data", str(tiny_run.dataset_root), "--run", str(tmp_path / "run"), "--steps", "1", *argv],
             capsys, named)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["status"], ["query", "SELECT 1"], ["mine"], ["export", "--format", "csv", "--out", "OUT"],
                                     ["trends", "--order", "a,b"]])
@pytest.mark.parametrize("where", ["missing", "file"])
def test_a_run_path_that_is_no_folder_is_named_so(command, where, tmp_path, capsys):
    """A mistyped --run: status said "nothing yet: start with diffmine train", query answered,
    mine said to re-run typicality, export to run mine."""
    run = tmp_path / "run"
    if where == "file":
        run.write_text("")
    argv = [command[0], "--run", str(run), *[str(tmp_path / "out") if a == "OUT" else a for a in command[1:]]]
    _refused(argv, capsys, f"{run}: no such run directory")
    assert not (tmp_path / "out").exists()


def test_run_refuses_the_later_steps_flags_before_training(tiny_run, tmp_path, capsys):
    """`run --patch 33` on 32 px images trained and scored every image, then was refused at mine."""
    out = tmp_path / "run"
    _refused(["run", "--data", str(tiny_run.dataset_root), "--run", str(out), "--resolution", "32", "--steps", "2",
              "--patch", "33"], capsys, "--patch 33", "32 px")
    assert not (out / "model").exists() and not (out / "typicality").exists()


@pytest.mark.parametrize("command", ["evaluate", "localize"])
def test_evaluate_and_localize_refuse_the_images_folder_or_a_file_as_masks(command, tiny_run, tmp_path, capsys):
    """The images folder given as --masks was read as masks (each image all "element": localize
    reported AUC-PR 1.0); a file said "no such mask folder"."""
    _refused([command, "--run", str(tiny_run.path), "--masks", str(tiny_run.dataset_root)], capsys, "images folder")
    notes = tmp_path / "masks.png"
    notes.write_bytes(b"")
    _refused([command, "--run", str(tiny_run.path), "--masks", str(notes)], capsys, "a file")


def test_compare_never_replaces_a_file_it_did_not_write(tiny_run, tmp_path, capsys):
    """--out naming a file of the user's: it was replaced unasked. The page it wrote is replaced."""
    compare = ["compare", "--run", str(tiny_run.path), "--run", str(_copied(tiny_run, tmp_path)), "--crops", "1",
               "--examples", "1"]
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    _refused([*compare, "--out", str(notes)], capsys, str(notes), "no page diffmine compare wrote")
    assert notes.read_text() == "<p>my notes</p>"
    _refused([*compare, "--out", str(tmp_path)], capsys, "a folder")
    page = tmp_path / "page.html"
    assert main([*compare, "--out", str(page)]) == 0 and main([*compare, "--out", str(page)]) == 0


@pytest.mark.parametrize("spelling", ["same", "slash", "link", "relative"])
def test_compare_refuses_the_same_run_twice_leaving_it(spelling, tiny_run, tmp_path, capsys, monkeypatch):
    """It was taken: a page of every map and patch beside itself (r = 1), written into the run."""
    run = _copied(tiny_run, tmp_path)
    before = run_files(run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(run)
    other = {"same": str(run), "slash": f"{run}/", "link": "link", "relative": "run"}[spelling]
    line = _refused(["compare", "--run", str(run), "--run", other], capsys, "are the same run", f"({run})")
    assert line.endswith("give two runs")
    assert run_files(run) == before and not (run / "compare").exists()


def test_compare_of_a_run_and_its_copy_says_the_two_sides_are_alike(tiny_run, tmp_path, capsys):
    """A run and its `cp -r` copy are two runs (the page is made), holding the same results: said
    in one line, which a run mined anew in the copy no longer gets."""
    import shutil

    run = _copied(tiny_run, tmp_path)
    copy = shutil.copytree(run, tmp_path / "copy")
    capsys.readouterr()
    assert main(["compare", "--run", str(run), "--run", str(copy)]) == 0
    assert "hold the same typicality and mined patches" in capsys.readouterr().err
    assert main(["mine", "--run", str(copy), "--top", "3", "--least", "2", "--random", "2"]) == 0
    capsys.readouterr()
    assert main(["compare", "--run", str(run), "--run", str(copy)]) == 0
    assert "hold the same" not in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--examples", "--crops"])
def test_compare_refuses_a_negative_count(flag, tiny_run, tmp_path, capsys):
    """--examples -1 was taken (a slice that left out the last image)."""
    _refused(["compare", "--run", str(tiny_run.path), "--run", str(tiny_run.path), "--out", str(tmp_path / "c.html"),
              flag, "-1"], capsys, flag)
    assert not (tmp_path / "c.html").exists()


@pytest.mark.parametrize("argv, named", [(["--threads", "0", "status", "--run", "RUN"], "--threads"),  # a traceback
                                         (["--threads", "100000", "status", "--run", "RUN"], "--threads"),  # ArrowMemoryError
                                         (["mine", "--run", "RUN", "--seed", "-1"], "--seed"),  # after mine's record was dropped
                                         (["synth", "--out", "RUN/synth", "--seed", "-1"], "--seed")])
def test_threads_and_seed_out_of_range_are_refused_by_the_parser(argv, named, tiny_run, tmp_path, capsys):
    run = _copied(tiny_run, tmp_path)
    before = run_files(run)
    _refused([str(run) + a[3:] if a.startswith("RUN") else a for a in argv], capsys, named)
    assert run_files(run) == before


def test_baseline_refuses_an_unknown_positive_label_before_force_clears_the_stored_one(tiny_run, tmp_path, capsys):
    """With --force the stored baseline was dropped first, then the label refused."""
    run = _copied(tiny_run, tmp_path)
    small = ["--patch", "8", "--stride", "2"]
    assert main(["baseline", "doersch", "--run", str(run), *small]) == 0
    before = run_files(run)
    _refused(["baseline", "doersch", "--run", str(run), *small, "--positive", "bogus", "--force"], capsys, "'bogus'")
    assert run_files(run) == before


def test_baseline_refuses_a_patch_and_stride_the_images_cannot_take_leaving_the_run(tiny_run, tmp_path, capsys):
    """The refusal came after an incomplete record of those settings was written: the corrected
    call was then refused as "made differently", and status offered the refused call again."""
    run = _copied(tiny_run, tmp_path)
    before = run_files(run)
    _refused(["baseline", "doersch", "--run", str(run), "--patch", "32", "--stride", "8"], capsys,
             "32px patches fit at most once in 32px images")
    assert run_files(run) == before


@pytest.mark.parametrize("argv, named", [(["--patch", "8", "--stride", "16"], "patch (8) must be a positive multiple of stride (16)"),
                                         (["--patch", "32", "--stride", "8"], "32px patches fit at most once in 32px")])
def test_baseline_refuses_a_patch_and_stride_before_listing(argv, named, tiny_run, tmp_path, capsys):
    """Each listed the dataset into a new run, then was refused."""
    _refused(["baseline", "doersch", "--data", str(tiny_run.dataset_root), "--run", str(tmp_path / "run"),
              "--resolution", "32", *argv], capsys, named)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--svm-max-iter", "0"), ("--workers", "-1"), ("--c", "nan")])
def test_baseline_refuses_nonsense_numbers(flag, value, tiny_run, tmp_path, capsys):
    _refused(["baseline", "doersch", "--run", str(_copied(tiny_run, tmp_path)), flag, value], capsys,
             {"--c": "C >"}.get(flag, flag[2:].replace("-", "_")))


def test_train_without_data_trains_on_the_listed_images_and_status_hints_run_as_pasted(tmp_path, capsys):
    """`diffmine train --run RUN` (no --data) goes on with the images the run lists: the command
    status names for a model whose files are gone carries the flags it was trained with, and pasted
    it rebuilds the same model (it was refused by the parser: --data was required). A listing flag
    given without --data is refused, the run left as it was."""
    import re
    import shlex

    from diffmine.rundir import Run
    from diffmine.status import status

    assert main(["synth", "--out", str(tmp_path / "data"), "--labels", "2", "--per-label", "3", "--size", "32"]) == 0
    run = Run(tmp_path / "run")
    _refused(["train", "--run", str(run.path)], capsys, "no listing result yet", "--data DIR")
    flags = ["--steps", "2", "--batch-size", "4", "--lr-schedule", "cosine", "--seed", "3"]
    assert main(["train", "--data", str(tmp_path / "data" / "images"), "--run", str(run.path), "--resolution", "32",
                 *flags]) == 0
    trained = run.lineage.get("model")["identity"]
    before = run_files(run.path)
    _refused(["train", "--run", str(run.path), "--prompt", "x", "--resolution", "32"], capsys,
             "--prompt, --resolution set how a dataset is listed: pass --data")
    assert run_files(run.path) == before
    for weights in run.model_dir.glob("*.safetensors"):
        weights.unlink()
    hint = re.search(r"train: its files in .* are gone: `diffmine (.*?)` rebuilds", status(run)).group(1)
    assert shlex.split(hint) == ["train", *flags[2:], *flags[:2], "--run", str(run.path)]
    assert main(shlex.split(hint)) == 0
    assert run.lineage.get("model")["identity"] == trained and "done (2 steps" in status(run)
    assert main(["train", "--run", str(run.path), *flags[2:], "--steps", "3"]) == 0  # train longer
    assert run.lineage.get("model")["steps"] == 3
    record = run.lineage.get("model")  # as a killed training leaves it: incomplete, its checkpoints kept
    run.lineage.put("model", record["settings"], record["inputs"], "train", identity="(training)", complete=False,
                    steps=3)
    goes_on = re.search(r"train: resumable at step-\d+: `diffmine (.*?)` goes on", status(run)).group(1)
    assert shlex.split(goes_on) == ["train", *flags[2:], "--steps", "3", "--run", str(run.path)]
    assert main(["train", "--run", str(run.path), "--steps", "3"]) == 2  # another recipe: refused, with its flags
    assert "`diffmine train --batch-size 4 --lr-schedule cosine --seed 3 --steps 3 --run" in capsys.readouterr().err


def test_baseline_lists_any_image_size_and_training_on_that_listing_is_refused_in_one_line(tiny_run, tmp_path, capsys):
    """The Doersch baseline loads no model: a new run listed by it at 30 px (no multiple of the
    embedded model's 4 px latent pixel) was refused; now it mines, and `train --run` on that listing
    is refused before it writes anything (not a traceback from the model's pixel_unshuffle)."""
    from diffmine.rundir import Run

    run = tmp_path / "run"
    assert main(["baseline", "doersch", "--data", str(tiny_run.dataset_root), "--run", str(run), "--resolution", "30",
                 "--patch", "8", "--stride", "2", "--positive", "norland"]) == 0
    assert Run(run).lineage.get("baseline-doersch")["complete"]
    before = run_files(run)
    _refused(["train", "--run", str(run), "--steps", "1"], capsys, "lists its images at 30 px",
             "not a multiple of 4", "--resolution 28 --run OTHER_RUN")
    assert run_files(run) == before


def test_run_without_data_goes_on_with_the_listed_run(tiny_run, tmp_path, capsys):
    """`diffmine run --run RUN` (an interrupted run finished without retyping --data and the
    prompts) uses the run's listing: every step of a finished run is up to date, nothing rewritten."""
    from conftest import TINY_ARGS

    run = _copied(tiny_run, tmp_path)
    before = run_files(run)
    capsys.readouterr()
    assert main(["run", "--run", str(run), *TINY_ARGS]) == 0
    out = capsys.readouterr().out
    assert all(f"{step}: up to date" in out for step in ("train", "typicality", "mine", "cluster"))
    assert {k: v for k, v in run_files(run).items() if not k.startswith("report")} == \
        {k: v for k, v in before.items() if not k.startswith("report")}
    _refused(["run", "--run", str(run), "--prompt", "x", *TINY_ARGS], capsys, "--prompt sets how a dataset is listed")
