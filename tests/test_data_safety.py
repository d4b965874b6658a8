"""Data safety of rt-convert, one test (or more) per hostile case of issue 13.

Each of these failed on the converter before the job/executor split: OUT == SRC overwrote the
sources; orphaned workers wrote after a kill; stale outputs were adopted after --restart; the
manifest had no source identity; two runs converted the same OUT at once; output names collided;
a full disk marked every file failed; symlink loops, read-only folders and bad options ended in
tracebacks; full-size models ran with random weights; valid JPEG/PNG files with trailing bytes
were refused and a zeroed JPEG scan was accepted; SIGTERM printed tracebacks.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from rtkit.datasets.sample import make_sample_dataset
from rtkit.engines.errors import RtkitError
from rtkit.engines.render2photo import BUNDLED_ONNX
from rtkit.runtime.converter import convert
from rtkit.runtime.job import EXIT_OK, EXIT_SOME_FAILED
from rtkit.runtime.manifest import manifest_path
from rtkit.runtime.outdir import OutputLock

BIN = Path(sys.executable).parent
RT_CONVERT = str(BIN / "rt-convert")


@pytest.fixture(scope="module")
def faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safety")
    make_sample_dataset(root / "render", style="render", identities=6, per_identity=4, seed=3)
    return root / "render"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tree_hash(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".rtkit" not in p.parts}


def _rows(out: Path, shard=None) -> dict:
    db = sqlite3.connect(manifest_path(out, shard))
    rows = {r[0]: r[1:] for r in db.execute("SELECT relpath, status, conversions, error FROM files")}
    db.close()
    return rows


def _run(*args, timeout=120, **kw):
    return subprocess.run([RT_CONVERT, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def _one_line_error(res, code=1):
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("Error")]
    assert len(lines) == 1, res.stderr
    return lines[0]


# -- 1. OUT may not be SRC, contain it, or write into it ---------------------------------------

@pytest.mark.parametrize("layout", ["same", "symlink", "src_inside_out"])
def test_output_folder_that_would_overwrite_sources_is_refused(faces, tmp_path, layout):
    src = _copy(faces, tmp_path / "data" / "faces")
    before = _tree_hash(src)
    out = {"same": src, "symlink": tmp_path / "link", "src_inside_out": tmp_path / "data"}[layout]
    if layout == "symlink":
        out.symlink_to(src, target_is_directory=True)
    with pytest.raises(RtkitError, match="source"):
        convert(BUNDLED_ONNX, src, out, progress=False)
    assert _tree_hash(src) == before  # not one source byte changed
    assert not (src / ".rtkit").exists()


def test_a_folder_in_output_linking_into_the_sources_is_refused(faces, tmp_path):
    src = _copy(faces, tmp_path / "src")
    before = _tree_hash(src)
    out = tmp_path / "out"
    (out / "deep").mkdir(parents=True)
    (out / "deep" / "0").symlink_to(src / "0", target_is_directory=True)
    (out / "1").symlink_to(src / "1", target_is_directory=True)
    with pytest.raises(RtkitError, match="links into the sources"):
        convert(BUNDLED_ONNX, src, out, progress=False)
    assert _tree_hash(src) == before


def test_output_inside_the_source_is_allowed_and_left_out(faces, tmp_path):
    src = _copy(faces, tmp_path / "faces")
    s = convert(BUNDLED_ONNX, src, src / "converted", progress=False)
    assert s.converted == 24 and s.exit_code == EXIT_OK
    again = convert(BUNDLED_ONNX, src, src / "converted", progress=False)
    assert again.total == 24 and again.already_done == 24  # its own outputs are not sources


# -- 2/3. kills: nobody writes after a killed run; nothing stale is adopted ---------------------

def _writers_free(out: Path, shard=None) -> bool:
    import fcntl

    path = str(manifest_path(out, shard)) + ".writers"
    if not os.path.exists(path):
        return True
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _start(src, out, *extra):
    return subprocess.Popen([RT_CONVERT, "--engine", BUNDLED_ONNX, str(src), str(out), "-q", *map(str, extra)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _kill_when_written(proc, out: Path, at_least: int, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(1 for _ in out.rglob("*.png")) >= at_least:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def many_faces(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    make_sample_dataset(root / "render", style="render", identities=60, per_identity=10, seed=5)
    return root / "render"


def _last_run(out: Path) -> int:
    if not manifest_path(out).exists():
        return 0
    db = sqlite3.connect(manifest_path(out))
    n = db.execute("SELECT coalesce(max(id), 0) FROM runs").fetchone()[0]
    db.close()
    return n


def _kill_when_recorded(proc, out: Path, at_least: int, after_run: int, timeout=60.0):
    """SIGKILL once a run newer than ``after_run`` has recorded ``at_least`` files as done (so it
    is past its start and has written outputs of its own settings)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            db = sqlite3.connect(manifest_path(out), timeout=1)
            n = db.execute("SELECT count(*) FROM files WHERE status='done' AND run > ?",
                           (after_run,)).fetchone()[0]
            db.close()
            if n >= at_least:
                break
        except sqlite3.Error:
            pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _sizes(out: Path) -> set:
    return {cv2.imread(str(p)).shape[:2] for p in out.rglob("*.png")}


def test_kill9_leaves_no_worker_and_a_restart_with_other_settings_owns_every_output(many_faces, tmp_path):
    out = tmp_path / "out"
    proc = _start(many_faces, out, "--batch-size", 64)
    _kill_when_written(proc, out, 30)
    t_kill = time.monotonic()
    while not _writers_free(out) and time.monotonic() - t_kill < 1.0:
        time.sleep(0.01)
    assert _writers_free(out), "a process of the killed run still holds the output folder after 1 s"
    res = _run("--engine", BUNDLED_ONNX, many_faces, out, "--restart", "--size", 64, "-q")
    assert res.returncode == 0, res.stderr
    assert _sizes(out) == {(64, 64)}  # nothing of the old size survived or landed later
    time.sleep(0.3)
    assert _sizes(out) == {(64, 64)}
    rows = _rows(out)
    assert len(rows) == 600 and all(r[0] == "done" and r[1] == 1 for r in rows.values())


def test_kill9_during_restart_then_plain_rerun_adopts_nothing_stale(many_faces, tmp_path):
    out = tmp_path / "out"
    assert _run("--engine", BUNDLED_ONNX, many_faces, out, "-q").returncode == 0  # 112 px everywhere
    last = _last_run(out)
    proc = _start(many_faces, out, "--restart", "--size", 48, "--batch-size", 64)
    _kill_when_recorded(proc, out, 64, last)  # some outputs of the new settings exist
    res = _run("--engine", BUNDLED_ONNX, many_faces, out, "--size", 48, "-q")
    assert res.returncode == 0, res.stderr
    assert _sizes(out) == {(48, 48)}
    assert all(r[0] == "done" and r[1] == 1 for r in _rows(out).values())


@pytest.mark.parametrize("mode", ["plain", "restart", "resume"])
def test_random_kills_then_other_settings_equal_an_uninterrupted_run(many_faces, tmp_path, mode):
    """Kill at random moments, then at once run with other settings: every output belongs to the
    last settings, each file converted exactly once, bytes equal to an uninterrupted run."""
    rng = np.random.default_rng({"plain": 0, "restart": 1, "resume": 2}[mode])
    reference = tmp_path / "reference"
    assert _run("--engine", BUNDLED_ONNX, many_faces, reference, "--size", 80, "-q").returncode == 0
    out = tmp_path / "out"
    if mode != "plain":
        assert _run("--engine", BUNDLED_ONNX, many_faces, out, "-q").returncode == 0
    for i in range(3):
        args = ["--size", 80 if mode == "resume" else 96 + 8 * i, "--batch-size", 16]
        if mode != "resume" or i == 0:
            args.append("--restart")
        last = _last_run(out)
        proc = _start(many_faces, out, *args)
        if mode == "resume" and i == 0:  # the settings must have changed before the resumes
            _kill_when_recorded(proc, out, 16, last)
            continue
        time.sleep(float(rng.uniform(0.3, 1.2)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = ["--restart"] if mode != "resume" else []
    res = _run("--engine", BUNDLED_ONNX, many_faces, out, "--size", 80, *final, "-q")
    assert res.returncode == 0, res.stderr
    assert _tree_hash(out) == _tree_hash(reference)
    rows = _rows(out)
    assert len(rows) == 600 and all(r[0] == "done" and r[1] == 1 for r in rows.values())


# -- 4. source and output identity --------------------------------------------------------------

def test_another_source_into_an_existing_output_is_refused(faces, tmp_path):
    other = _copy(faces, tmp_path / "other")
    out = tmp_path / "out"
    convert(BUNDLED_ONNX, faces, out, progress=False)
    with pytest.raises(RtkitError, match="source"):
        convert(BUNDLED_ONNX, other, out, progress=False)


def test_edited_source_and_damaged_outputs_are_redone(faces, tmp_path):
    src = _copy(faces, tmp_path / "src")
    out = tmp_path / "out"
    convert(BUNDLED_ONNX, src, out, progress=False)
    reference = _tree_hash(out)
    edited, truncated, emptied = "0/0.png", "1/1.png", "2/2.png"
    img = cv2.imread(str(src / edited))
    cv2.imwrite(str(src / edited), 255 - img)
    data = (out / truncated).read_bytes()
    (out / truncated).write_bytes(data[: len(data) // 2])
    (out / emptied).write_bytes(b"")
    s = convert(BUNDLED_ONNX, src, out, progress=False)
    assert s.converted == 3 and s.redone == 3 and s.already_done == 21
    now = _tree_hash(out)
    assert now[truncated] == reference[truncated] and now[emptied] == reference[emptied]
    assert now[edited] != reference[edited]  # the new source's translation, not the old one
    # A touch that keeps the content is not a change: the recorded hash decides.
    os.utime(src / "3/3.png", ns=(1, 1))
    assert convert(BUNDLED_ONNX, src, out, progress=False).converted == 0


# -- 5. one run at a time -----------------------------------------------------------------------

def test_second_run_on_the_same_output_is_refused_naming_the_holder(faces, tmp_path):
    out = tmp_path / "out"
    with OutputLock(manifest_path(out)):
        res = _run("--engine", BUNDLED_ONNX, faces, out, "-q")
    line = _one_line_error(res)
    assert "another run" in line and f"pid {os.getpid()}" in line
    assert not list(out.rglob("*.png"))


# -- 6. output names that cannot collide ------------------------------------------------------------

def test_output_name_collisions_are_refused_before_any_work(faces, tmp_path):
    src = _copy(faces, tmp_path / "src")
    cv2.imwrite(str(src / "0" / "0.jpg"), cv2.imread(str(src / "0" / "0.png")))
    out = tmp_path / "out"
    for shard in (None, (0, 2), (1, 2)):
        with pytest.raises(RtkitError, match="collision.*0/0.jpg and 0/0.png -> 0/0.png"):
            convert(BUNDLED_ONNX, src, out, progress=False, shard=shard)
    assert not list(out.rglob("*.png"))


def test_shards_of_another_split_into_one_output_are_refused(faces, tmp_path):
    out = tmp_path / "out"
    convert(BUNDLED_ONNX, faces, out, progress=False, shard=(0, 2))
    with pytest.raises(RtkitError, match="shard"):
        convert(BUNDLED_ONNX, faces, out, progress=False, shard=(0, 3))
    convert(BUNDLED_ONNX, faces, out, progress=False, shard=(1, 2))
    assert len(list(out.rglob("*.png"))) == 24


# -- 7. a full disk stops the run --------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("processes", [0, 2])
def test_disk_full_stops_the_run_with_one_line_and_fails_nothing(many_faces, tiny_disk, processes):
    out = tiny_disk / "out"
    res = _run("--engine", BUNDLED_ONNX, many_faces, out, "--processes", processes, "-q")
    line = _one_line_error(res)
    assert "space" in line.lower() or "full" in line.lower(), line
    rows = _rows(out)
    assert not [r for r in rows.values() if r[0] == "failed"]
    # With room again, the same command finishes: every file exactly once, nothing lost.
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    res = _run("--engine", BUNDLED_ONNX, many_faces, out, "--processes", processes, "-q")
    assert res.returncode == 0, res.stderr
    rows = _rows(out)
    assert len(rows) == 600 and all(r[0] == "done" and r[1] == 1 for r in rows.values())
    assert all(cv2.imread(str(p)) is not None for p in out.rglob("*.png"))


def test_read_only_output_is_one_line(faces, tiny_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], check=True)
    line = _one_line_error(_run("--engine", BUNDLED_ONNX, faces, tiny_disk / "out", "-q"))
    assert "Read-only" in line or "read-only" in line


# -- 8. folders that are loops, unreadable, or too long ----------------------------------------------

def test_symlink_loop_and_too_long_paths_are_recorded_not_raised(faces, tmp_path):
    src = _copy(faces, tmp_path / "s")
    (src / "0" / "loop").symlink_to(src, target_is_directory=True)
    deep = src / "deep"
    part = "d" * 200
    p = deep
    while len(str(p)) < 3900:
        p = p / part
    p.mkdir(parents=True)
    shutil.copy(src / "1" / "1.png", p / "x.png")
    out = tmp_path / ("o" * 200) / ("o" * 200)  # outputs get a longer prefix than their sources
    res = _run("--engine", BUNDLED_ONNX, src, out, "-q")
    assert res.returncode == EXIT_SOME_FAILED, res.stderr
    assert "Traceback" not in res.stderr
    rows = _rows(out)
    assert rows["0/loop"][0] == "skipped" and "loop" in rows["0/loop"][2]
    long = [k for k in rows if k.endswith("x.png")]
    assert rows[long[0]][0] == "failed" and "too long" in rows[long[0]][2]
    assert sum(r[0] == "done" for r in rows.values()) == 24


def test_unreadable_subfolder_is_recorded_and_the_rest_converts(faces, tmp_path):
    if not shutil.which("setpriv"):
        pytest.skip("setpriv is needed to run as an unprivileged user")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rtkit-unreadable-", dir="/tmp"))  # reachable by nobody
    src = _copy(faces, base / "s")
    for p in [base, *base.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o666)
    (src / "5").chmod(0o000)
    out = base / "out"
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", RT_CONVERT,
                          "--engine", BUNDLED_ONNX, str(src), str(out), "-q", "--processes", "0"],
                         capture_output=True, text=True, timeout=120)
    (src / "5").chmod(0o755)
    if "Permission denied" in res.stderr and "rt-convert" in res.stderr:
        pytest.skip("the unprivileged user cannot run the test environment")
    assert res.returncode == 0, res.stderr
    rows = _rows(out)
    shutil.rmtree(base)
    assert rows["5"][0] == "skipped" and "unreadable" in rows["5"][2]
    assert sum(r[0] == "done" for r in rows.values()) == 20


# -- 9/10. options and weights -------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--size", "0"], "--size"), (["--size", "-5"], "--size"), (["--size", "100000"], "--size"),
    (["--batch-size", "0"], "batch"), (["--no-such-option"], "no-such-option"),
    (["--shard", "3/2"], "shard"),
])
def test_bad_options_are_one_line_and_exit_1(faces, tmp_path, args, needle):
    line = _one_line_error(_run("--engine", BUNDLED_ONNX, faces, tmp_path / "out", *args))
    assert needle in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.png"))


def test_full_size_model_without_weights_needs_random_weights(faces, tmp_path):
    line = _one_line_error(_run("--engine", "vsait", faces, tmp_path / "out"))
    assert "--random-weights" in line and "checkpoint" in line


# -- 11. one decoder policy in every executor ---------------------------------------------------------

def _jpeg(img) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def _png_with_bad_ancillary_crc(img) -> bytes:
    import struct
    import zlib

    data = cv2.imencode(".png", img)[1].tobytes()
    text = b"tEXt" + b"Comment\x00hello"
    chunk = struct.pack(">I", len(text) - 4) + text + struct.pack(">I", zlib.crc32(text) ^ 1)
    return data[:33] + chunk + data[33:]


@pytest.mark.parametrize("processes", [0, 2])
def test_decoder_policy_is_the_same_in_threads_and_processes(faces, tmp_path, processes):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    img = cv2.imread(str(faces / "0" / "0.png"))
    jpg = _jpeg(img)
    (src / "a" / "trailing.jpg").write_bytes(jpg + b"\x00" * 2000 + b"trailer")
    png = cv2.imencode(".png", img)[1].tobytes()
    (src / "a" / "trailing_png.png").write_bytes(png + b"extra bytes after IEND")
    sos = jpg.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpg[sos + 2:sos + 4], "big")
    (src / "a" / "zeroed.jpg").write_bytes(jpg[:start] + b"\x00" * (len(jpg) - start - 2) + b"\xff\xd9")
    (src / "a" / "badcrc.png").write_bytes(_png_with_bad_ancillary_crc(img))
    out = tmp_path / "out"
    s = convert(BUNDLED_ONNX, src, out, progress=False, processes=processes)
    rows = _rows(out)
    assert rows["a/trailing.jpg"][0] == "done" and rows["a/trailing_png.png"][0] == "done"
    assert rows["a/zeroed.jpg"][0] == "failed" and "JPEG" in rows["a/zeroed.jpg"][2]
    assert rows["a/badcrc.png"][0] == "failed" and "CRC" in rows["a/badcrc.png"][2]
    assert s.exit_code == EXIT_SOME_FAILED


# -- 12. SIGTERM, killed runs, start-up in the rate ------------------------------------------------------

def test_sigterm_is_one_line_and_killed_runs_are_marked(many_faces, tmp_path):
    out = tmp_path / "out"
    proc = _start(many_faces, out, "--batch-size", 8)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and sum(1 for _ in out.rglob("*.png")) < 10:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 143 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert "SIGTERM" in err
    proc = _start(many_faces, out, "--batch-size", 8)
    while time.monotonic() < deadline and proc.poll() is None and _rows(out) and \
            sum(r[0] == "done" for r in _rows(out).values()) < 300:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = _run("--engine", BUNDLED_ONNX, many_faces, out)
    assert res.returncode == 0
    assert "after start-up" in res.stdout and "start-up" in res.stdout
    db = sqlite3.connect(manifest_path(out))
    states = [r[0] for r in db.execute("SELECT state FROM runs ORDER BY id")]
    db.close()
    assert states == ["interrupted", "killed", "finished"]


def test_rt_eval_and_rt_bench_refuse_random_weights_without_the_flag(faces, tmp_path):
    from click.testing import CliRunner

    from rtkit.cli.bench import main as bench
    from rtkit.cli.eval import main as rt_eval
    from rtkit.eval.pairs import make_pairs
    from rtkit.eval.verification import build_bin

    make_pairs(faces, tmp_path / "pairs.txt", folds=2, pairs_per_fold=4, seed=0)
    build_bin(faces, tmp_path / "pairs.txt", tmp_path / "x.bin")
    res = CliRunner().invoke(rt_eval, ["verify", "--engine", "iresnet50", "--bin", str(tmp_path / "x.bin"), "--folds", "2",
                                       "--no-cache", "-q"])
    assert res.exit_code == 1 and "--random-weights" in res.output, res.output
    res = CliRunner().invoke(bench, ["time", "vsait", "--seconds", "0.1"])
    assert res.exit_code == 1 and "--random-weights" in res.output, res.output


def test_encoder_processes_write_the_same_bytes_and_die_with_the_run(many_faces, tmp_path):
    """--encode-processes (the GPU path's CPU-bound stage in processes): the threaded pipeline's bytes,
    and after a kill -9 no encoder process holds the output folder a second later."""
    a = convert(BUNDLED_ONNX, many_faces, tmp_path / "threads", progress=False, processes=0)
    b = convert(BUNDLED_ONNX, many_faces, tmp_path / "encoders", progress=False, encode_processes=2)
    assert a.converted == b.converted == 600
    assert _tree_hash(tmp_path / "threads") == _tree_hash(tmp_path / "encoders")
    out = tmp_path / "killed"
    proc = _start(many_faces, out, "--encode-processes", 2, "--batch-size", 8)
    _kill_when_written(proc, out, 40)
    t_kill = time.monotonic()
    while not _writers_free(out) and time.monotonic() - t_kill < 1.0:
        time.sleep(0.01)
    assert _writers_free(out), "an encoder process of the killed run still holds the output folder"
    assert _run("--engine", BUNDLED_ONNX, many_faces, out, "--encode-processes", 2, "-q").returncode == 0
    assert _tree_hash(out) == _tree_hash(tmp_path / "threads")
    assert all(r[0] == "done" and r[1] == 1 for r in _rows(out).values())
