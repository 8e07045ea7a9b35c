"""scripts/bench_coldstart.py's pure parts: its arguments, its refusal, the schedule, the original's command
line and the aggregation of runs. The benchmark itself needs root, FUSE and the real Forge; the lead runs it."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.coldstart.conftest import SCRIPTS, load_script
from volume_layout import VolumeLayout

bench = load_script("bench_coldstart")


def test_defaults_are_the_issues_settings_and_every_variant(tmp_path: Path) -> None:
    args = bench.parse_args(["--work", str(tmp_path)])
    assert [s.label for s in args.settings] == ["1,1,400", "5,2,200"]
    assert args.runs == 3 and args.variants == ("original", "ours-off", "ours", "limit", "warm")
    assert args.volume == Path("/work/realvol/volume") and not args.no_install
    assert args.out == tmp_path / "result.json"
    args = bench.parse_args(["--settings", "0,0,0", "1,1,400", "--runs", "1", "--variants", "ours-off,limit",
                             "--no-install", "--out", str(tmp_path / "r.json")])
    assert [s.label for s in args.settings] == ["0,0,0", "1,1,400"]
    assert args.variants == ("ours-off", "limit") and args.no_install and args.out == tmp_path / "r.json"


@pytest.mark.parametrize(("argv", "message"), [
    (["--settings", "1,1"], "META_MS,READ_MS,BW_MBPS"),
    (["--settings", "1,-1,400"], "finite number >= 0"),
    (["--variants", "ours,bogus"], "unknown variant(s) bogus"),
    (["--runs", "0"], "whole number >= 1"),
    (["--deadline", "0"], "--deadline must be > 0"),
])
def test_bad_arguments_are_refused_with_what_is_wrong(argv: list[str], message: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def _checkout(root: Path) -> Path:
    for package in ("worker", "provision"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    return root


def test_a_candidate_is_one_more_fuse_variant_with_the_workers_code_from_its_checkout(tmp_path: Path) -> None:
    other = _checkout(tmp_path / "other")
    lab = _args(tmp_path).lab  # a lab and a volume the bench accepts
    args = bench.parse_args(["--work", str(tmp_path / "w"), "--variants", "ours,limit", "--candidate",
                             f"wide={other}", "--volume", str(tmp_path / "volume"), "--lab", str(lab)])
    assert args.variants == ("ours", "limit", "wide") and args.candidates == {"wide": other}
    assert [v for _, _, v in bench.schedule(args.settings[:1], args.variants, 2)] == [
        "ours", "limit", "wide", "limit", "wide", "ours"]
    run = bench.Bench(args, bench.Cleanup())
    argv, env = run.worker_command(tmp_path, "wide", 1, 2)
    assert env["PYTHONPATH"] == str(other) and argv[1:3] == ["-m", "worker"] and "FORGE_FAST_BOOT" not in env
    assert "PYTHONPATH" not in run.worker_command(tmp_path, "ours", 1, 2)[1]
    out = bench.aggregate([_run("ours", 20.0), _run("limit", 16.0), _run("wide", 18.0)], candidates=["wide"])
    ratios = out["1,1,400"]["ratios"]
    assert ratios["wide/ours image"] == pytest.approx(0.9) and ratios["wide/limit image"] == pytest.approx(1.125)
    assert bench.checkout_commit(other) == "unknown (not a git checkout)"


@pytest.mark.parametrize(("value", "message"), [
    ("wide", "give NAME=DIR"), ("ours=.", "none of original"), ("Wide=.", "give NAME=DIR"),
    ("wide=/nonexistent", "is not a checkout of forge-volume"),
])
def test_a_bad_candidate_is_refused_with_what_to_give(value: str, message: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--candidate", value])
    assert message in capsys.readouterr().err


def test_two_candidates_of_one_name_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = _checkout(tmp_path / "other")
    with pytest.raises(SystemExit):
        bench.parse_args(["--candidate", f"a={other}", "--candidate", f"a={other}"])
    assert "--candidate names must differ" in capsys.readouterr().err


def _args(tmp_path: Path, **kw: Any) -> argparse.Namespace:
    lab = tmp_path / "lab"
    volume = tmp_path / "volume"
    lab.mkdir(exist_ok=True)
    (lab / "env.sh").write_text("export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1\n")
    layout = VolumeLayout(volume)
    layout.venv_python.parent.mkdir(parents=True, exist_ok=True)
    layout.venv_python.write_text("")
    layout.forge_dir.mkdir(parents=True, exist_ok=True)
    args = bench.parse_args(["--lab", str(lab), "--volume", str(volume), "--work", str(tmp_path / "work")])
    for key, value in kw.items():
        setattr(args, key, value)
    return args


def test_refusal_says_in_one_line_what_is_missing(tmp_path: Path) -> None:
    args = _args(tmp_path)
    assert bench.refusal(args, euid=0, fuse_dev=Path("/dev/null")) is None
    assert "needs root" in bench.refusal(args, euid=1000)
    assert "needs /no/fuse" in bench.refusal(args, euid=0, fuse_dev=Path("/no/fuse"))
    no_lab = _args(tmp_path, lab=tmp_path / "nolab")
    assert "needs the Forge lab" in bench.refusal(no_lab, euid=0, fuse_dev=Path("/dev/null"))
    no_volume = _args(tmp_path, volume=tmp_path / "empty")
    assert "needs a volume provisioned from the lab" in bench.refusal(no_volume, euid=0, fuse_dev=Path("/dev/null"))
    for why in (bench.refusal(args, euid=1000), bench.refusal(no_lab, euid=0, fuse_dev=Path("/dev/null"))):
        assert "\n" not in why


def test_the_script_refuses_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    run = subprocess.run([sys.executable, str(SCRIPTS / "bench_coldstart.py"), "--lab", str(tmp_path / "nolab"),
                          "--work", str(work)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_coldstart: needs "), run.stderr
    assert not work.exists()


def test_lab_env_reads_the_exports(tmp_path: Path) -> None:
    (tmp_path / "env.sh").write_text('# comment\nexport A=/x B="two words" # trailing\nexport C=1\nD=2\n')
    assert bench.lab_env(tmp_path) == {"A": "/x", "B": "two words", "C": "1"}


def test_schedule_interleaves_rounds_and_turns_the_order() -> None:
    one, five = bench.Latency.parse("1,1,400"), bench.Latency.parse("5,2,200")
    plan = [(s.label, r, v) for s, r, v in bench.schedule([one, five], ["a", "b", "c"], 3)]
    assert plan[:9] == [("1,1,400", 1, "a"), ("1,1,400", 1, "b"), ("1,1,400", 1, "c"),
                        ("1,1,400", 2, "b"), ("1,1,400", 2, "c"), ("1,1,400", 2, "a"),
                        ("1,1,400", 3, "c"), ("1,1,400", 3, "a"), ("1,1,400", 3, "b")]
    assert len(plan) == 18 and {p[0] for p in plan[9:]} == {"5,2,200"}


def test_the_originals_command_is_its_start_sh_with_what_this_machine_needs(tmp_path: Path) -> None:
    layout = VolumeLayout(tmp_path / "volume")
    argv = bench.original_argv(layout, tmp_path / "scratch" / "data", 4321)
    assert argv[:2] == [str(layout.venv_python), str(layout.forge_dir / "webui.py")]
    for flag in ("--api", "--nowebui", "--no-hashing", "--skip-install", "--lowram", "--no-half-vae",
                 "--disable-safe-unpickle", "--opt-sdp-attention", "--no-download-sd-model"):
        assert flag in argv
    assert "--xformers" not in argv and "--always-cpu" in argv
    assert argv[argv.index("--port") + 1] == "4321"
    assert argv[argv.index("--models-dir") + 1] == str(layout.models_dir)
    assert argv[argv.index("--data-dir") + 1] == str(tmp_path / "scratch" / "data")


def _run(variant: str, image: float | None, setting: str = "1,1,400", meta: int = 100, **kw: Any) -> dict[str, Any]:
    fuse = {"meta": meta, "missing": 1, "opens": 10, "files_opened": 9, "bytes": 1000,
            "top_sources": [["/venv/lib/python3.11/site-packages/torch", meta]]}
    return {"setting": setting, "variant": variant, "round": 1, "ok": image is not None, "error": "",
            "forge_s": image and image / 2, "models_s": image and image / 2 + 1, "image_s": image,
            "fuse_before": fuse, "fuse_total": fuse, "fuse_after": None,
            "memory": {"worker": {"vmhwm_kb": 60000, "peak_rss_anon_kb": 50000}, "shmem_growth_kb": 2048,
                       "forge": {"vmhwm_kb": 7000000, "peak_rss_anon_kb": 4000000}}, **kw}


def test_aggregate_takes_medians_of_the_runs_that_worked_and_the_ratios() -> None:
    runs = [_run("original", 90.0), _run("original", 100.0), _run("original", 95.0),
            _run("ours", 40.0, meta=10), _run("ours", None), _run("ours", 50.0, meta=30),
            _run("limit", 20.0), _run("warm", 21.0), _run("ours", 300.0, setting="5,2,200")]
    out = bench.aggregate(runs)
    one = out["1,1,400"]
    assert one["variants"]["original"]["image_s"] == 95.0
    assert one["variants"]["original"]["image_s_all"] == [90.0, 100.0, 95.0]
    ours = one["variants"]["ours"]
    assert (ours["image_s"], ours["runs"], ours["failed"]) == (45.0, 3, 1)
    assert ours["image_s_all"] == [40.0, None, 50.0]
    assert ours["fuse_total"]["meta"] == 20 and ours["forge_peak_rss_anon_kb"] == 4000000
    assert ours["shmem_growth_kb"] == 2048
    assert one["ratios"]["ours/original image"] == pytest.approx(45 / 95, abs=1e-3)
    assert one["ratios"]["ours/limit image"] == pytest.approx(2.25)
    assert one["ratios"]["warm/limit image"] == pytest.approx(1.05)
    assert "ours/original image" not in out["5,2,200"]["ratios"]  # no original there: no ratio
    text = bench.report(out)
    assert "ours/original image 0.47" in text and "original" in text and "5,2,200" in text


def test_forges_own_calls_to_the_volume_are_told_apart_from_the_workers_and_the_lay_outs() -> None:
    """What Forge itself waited for on the volume before it answered: the processes running its launcher, not the
    worker's nor the lay-out child's (which reads gigabytes beside it)."""
    snapshot = {"procs": {
        "1": {"meta": 40, "reads": 4, "bytes": 100, "cmd": "python -m worker --rp_serve_api"},
        "2": {"meta": 2750, "reads": 12344, "bytes": 2690808453, "cmd": "python -m provision.boot.layout_child /v /m"},
        "3": {"meta": 260, "reads": 110, "bytes": 9531517, "cmd": "/m/venv/bin/python /m/forge/launch.py --api"}}}
    assert bench.forge_calls(snapshot) == {"meta": 260, "reads": 110, "bytes": 9531517}
    assert bench.forge_calls({}) == {"meta": 0, "reads": 0, "bytes": 0}
    fuse = {"meta": 3000, "missing": 1, "opens": 10, "files_opened": 9, "bytes": 1000, "top_sources": []}
    runs = [_run("ours", 20.0, fuse_before={**fuse, "forge": {"meta": 230, "reads": 190, "bytes": 16 << 20}}),
            _run("ours", 22.0, fuse_before={**fuse, "forge": {"meta": 250, "reads": 170, "bytes": 14 << 20}}),
            _run("limit", 15.0, fuse_before=None)]
    text = bench.report(bench.aggregate(runs))
    assert ("Forge's own calls to the volume before it answered, ours (medians): 240 metadata calls, 180 reads "
            "(15.0 MiB)") in text
    assert "answered, limit" not in text


def test_the_same_round_ratio_pairs_each_round_with_itself() -> None:
    """Medians of different rounds can pair a fast limit with a slow ours: 20/10 and 12/12 give medians 16 and 11
    (1.45) where the rounds say 2.0 and 1.0."""
    runs = [_run("ours", 20.0, round=1), _run("limit", 10.0, round=1), _run("ours", 12.0, round=2),
            _run("limit", 12.0, round=2), _run("ours", 30.0, round=3), _run("limit", None, round=3),
            _run("ours", 14.0, round=3, setting="5,2,200"), _run("limit", 7.0, round=3, setting="5,2,200")]
    assert sorted(bench.same_round(runs, "1,1,400", "ours", "limit")) == [1.0, 2.0]  # round 3's limit failed
    ratios = bench.aggregate(runs)["1,1,400"]["ratios"]
    assert ratios["ours/limit image, same-round median"] == pytest.approx(1.5)
    assert ratios["ours/limit image"] == pytest.approx(20 / 11, abs=1e-3)
    assert bench.aggregate(runs)["5,2,200"]["ratios"]["ours/limit image, same-round median"] == pytest.approx(2.0)


LOG = "\n".join([
    "[worker] fast boot: 12536 files (358.0 MiB) of the boot set laid out on local disk in 1.42 s; prefetching in "
    "the background",
    "[worker] starting Forge: /dev/shm/forge-mirror-x/venv/bin/python launch.py --nowebui --api",
    "[worker] fast boot: the volume checked (2580 folders unchanged) in 0.84 s",
    "[worker] fast boot: prefetched 2.2 GiB in 6.10 s: the libraries' pages (238.9 MiB) in 1.20 s, then the "
    "checkpoint (2.0 GiB) in 4.90 s",
    "Startup time: 9.7s (launcher: 0.6s, import torch: 5.9s, initialize shared: 0.4s, other imports: 1.0s).",
    "[worker] Forge ready after 10.15 s",
    "Model loaded in 21.7s (unload existing model: 0.5s, calculate hash: 19.2s, forge model load: 2.0s).",
    "Model loaded in 1.0s (forge model load: 1.0s).",
]) + "\n"


def test_the_phases_come_from_the_workers_and_forges_own_lines() -> None:
    assert bench.phases(LOG) == {"lay-out": 1.42, "libraries prefetched": 1.2, "volume checked": 0.84,
                                 "checkpoint read": 4.9,
                                 "Forge startup": 9.7, "import torch": 5.9, "Forge ready": 10.15,
                                 "model load": 21.7, "hashing": 19.2}
    assert bench.phases("Startup time: 20.1s (launcher: 1.0s).\n") == {"Forge startup": 20.1}  # the original's


def test_the_full_size_bound_is_the_checkpoints_read_plus_a_warm_answer_or_the_limit() -> None:
    runs = [_run("ours", 40.0, phases={"lay-out": 1.5}), _run("limit", 20.0), _run("warm", 22.0)]  # warm forge_s 11
    out = bench.aggregate(runs, checkpoint_bytes=6_900_000_000)  # 17.25 s at 400 MB/s
    assert out["1,1,400"]["bound_s"] == pytest.approx(17.25 + 11.0)
    assert out["1,1,400"]["ratios"]["ours/bound image"] == pytest.approx(40 / 28.25, abs=1e-3)
    assert out["1,1,400"]["variants"]["ours"]["phases"] == {"lay-out": 1.5}
    small = bench.aggregate(runs, checkpoint_bytes=2_000_000_000)["1,1,400"]  # 5 + 11 < the limit's 20
    assert small["bound_s"] == pytest.approx(20.0)
    text = bench.report(out)
    assert "where the time goes, ours (medians, from its log): lay-out 1.5 s" in text and "= 28.2 s" in text


def test_a_run_waits_for_the_last_ones_group_to_be_gone_and_the_machine_to_be_quiet() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert bench.group_members(sleeper.pid) == [sleeper.pid]
        cleanup = bench.Cleanup()
        cleanup.stop(sleeper, grace=0.1)
        assert bench.group_members(sleeper.pid) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    assert 0.0 <= bench.cpu_idle(0.1) <= 1.0
    assert bench.settle(deadline=5.0, idle=0.0) < 1.0  # one look (half a second): quiet enough, no more wait


def test_the_fuse_daemons_cpu_seconds_are_read_from_proc_and_none_once_it_is_gone() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\n"
                                "while time.process_time() < end: pass\nprint(flush=True)\ntime.sleep(60)"],
                               stdout=subprocess.PIPE)
    try:
        assert spinner.stdout is not None and spinner.stdout.readline() == b"\n"  # 0.3 s of CPU spent
        spent = bench.cpu_seconds(spinner.pid)
        assert spent is not None and 0.25 <= spent < 30  # ticks of 10 ms, rounded down
    finally:
        spinner.kill()
        spinner.wait()
    assert bench.cpu_seconds(spinner.pid) is None


def test_host_memory_turns_page_reporting_off_for_the_bench_and_back(tmp_path: Path) -> None:
    knob = tmp_path / "page_reporting_order"
    knob.write_text("9\n")
    touched: list[int] = []
    kdamonds = tmp_path / "kdamonds"
    for n, state in (("0", "on"), ("1", "off")):
        (kdamonds / n).mkdir(parents=True)
        (kdamonds / n / "state").write_text(f"{state}\n")
    memory = bench.HostMemory(knob, kdamonds)
    held = memory.hold(touch=touched.append)
    assert knob.read_text() == f"{bench.NO_REPORTING_ORDER}\n"
    assert held["page_reporting"] == "off for the bench (was order 9)"
    assert held["damon"] == "1 kdamond(s) off for the bench"
    assert [(kdamonds / n / "state").read_text() for n in "01"] == ["off\n", "off\n"]
    assert len(touched) == 1 and touched[0] >= 0 and held["pretouched_mib"] == touched[0] >> 20
    memory.release()
    assert knob.read_text() == "9\n"
    assert [(kdamonds / n / "state").read_text() for n in "01"] == ["on\n", "off\n"]  # only the one it stopped
    memory.release()  # once only: a second release writes nothing
    assert knob.read_text() == "9\n"


def test_host_memory_leaves_a_machine_without_the_knob_as_it_is(tmp_path: Path) -> None:
    touched: list[int] = []
    memory = bench.HostMemory(tmp_path / "absent", tmp_path / "no-kdamonds")
    assert memory.hold(touch=touched.append) == {"page_reporting": "absent", "damon": "absent"}
    memory.release()
    assert touched == [] and not (tmp_path / "absent").exists()


def test_pretouch_faults_in_the_memory_it_is_given_and_frees_it() -> None:
    assert bench.pretouch(64 << 20) >= 64 << 20  # the child held every page of it at once
    with pytest.raises(bench.BenchError, match="free memory failed"):
        bench.pretouch(-1)


def test_a_source_serves_a_copy_of_the_volume_to_one_fuse_variant(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "copy"
    (copy / "venv").mkdir(parents=True)
    args = bench.parse_args(["--work", str(tmp_path / "w"), "--variants", "ours,limit", "--source", f"ours={copy}"])
    assert args.sources == {"ours": copy}
    for value, message in ((f"limit={copy}", "--source for limit: only a variant run through FUSE"),
                           (f"ours={tmp_path}", "PATH a copy of the volume (with its venv/)")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--work", str(tmp_path / "w"), "--variants", "ours,limit", "--source", value])
        assert message in capsys.readouterr().err


check_bench = load_script("bench_check")


@pytest.mark.parametrize(("argv", "message"), [
    (["--volume", "v", "--settings", "1,1"], "META_MS,READ_MS,BW_MBPS"),
    (["--volume", "v", "--runs", "0"], "whole number >= 1"),
    (["--volume", "v", "--threads", "x"], "whole number >= 1"),
    ([], "--volume"),
])
def test_the_check_bench_refuses_bad_arguments_with_what_is_wrong(argv: list[str], message: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        check_bench.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    args = check_bench.parse_args(["--volume", "v"])
    assert [s.label for s in args.settings] == ["1,1,400", "5,2,200"] and (args.runs, args.threads) == (3, 16)


layout_bench = load_script("bench_layout")


@pytest.mark.parametrize(("argv", "message"), [
    (["--volume", "v", "--threads", "4,x"], "distinct whole numbers >= 1"),
    (["--volume", "v", "--threads", "4,4"], "distinct whole numbers >= 1"),
    (["--volume", "v", "--threads", "0,4"], "distinct whole numbers >= 1"),
    (["--volume", "v", "--runs", "0"], "whole number >= 1"),
    (["--threads", "4"], "--volume"),
])
def test_the_lay_out_bench_refuses_bad_arguments_with_what_is_wrong(argv: list[str], message: str,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        layout_bench.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    args = layout_bench.parse_args(["--volume", "v", "--threads", "16,2,4"])
    assert args.threads == (16, 2, 4) and [s.label for s in args.settings] == ["1,1,400", "5,2,200"]
    assert layout_bench.parse_args(["--volume", "v"]).threads == (4, 16)

