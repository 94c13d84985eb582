"""A wheel that works without the repository: its presets are package data, it serves `+preset=test`, and
the trainer's side reads from it with nothing but the base install's packages.

The wheel is built from this checkout and installed (not editable) into a fresh virtual environment whose
third-party packages come from the suite's own environment through a path file, so no download is needed;
the checkout itself is never on the path (the server runs from an empty directory).
"""
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
# What a training machine does not install: `pip install actdata` brings torch, numpy and requests only.
SERVER_SIDE = ("litserve", "fastapi", "starlette", "uvicorn", "hydra", "omegaconf", "transformers", "datasets",
               "prometheus_client", "ray", "lightning", "safetensors", "fsspec")


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:  # a copy: building in place would leave build/ and egg-info in the checkout
        if (REPO / name).is_file():
            (root / "src" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / "src" / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(root / "dist"), str(root / "src")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (root / "dist").glob("actdata-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    py = root / "venv" / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the suite's packages, without running its .pth files (the editable install of this checkout lives there)
    pathlib.Path(site, "suite-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as z:  # a wheel is installed by unpacking it into site-packages
        z.extractall(site)
    work = root / "elsewhere"
    work.mkdir()
    return wheel, py, work


# the suite may run with the checkout on PYTHONPATH: the wheel's environment must not see it
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(py, work, code, timeout=120):
    return subprocess.run([str(py), "-c", textwrap.dedent(code)], cwd=work, capture_output=True, text=True,
                          timeout=timeout, env=CLEAN_ENV)


def test_the_wheel_carries_the_presets_and_every_subpackage(wheel_env):
    wheel, _, _ = wheel_env
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("test", "production", "large-scale", "env"):
        assert f"actdata/conf/preset/{preset}.yaml" in names
    assert "actdata/conf/config.yaml" in names
    assert "actdata/serving/status.html" in names  # the status page GET / gives a browser
    for sub in ("shm", "reading", "generation", "storage", "serving", "cluster"):
        assert f"actdata/{sub}/__init__.py" in names
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


def test_the_installed_wheel_serves_and_the_base_install_reads(wheel_env):
    _, py, work = wheel_env
    where = run(py, work, "import actdata; print(actdata.__file__)")
    assert where.returncode == 0 and str(REPO) not in where.stdout, where.stdout + where.stderr
    server = subprocess.Popen(
        [str(py), "-m", "actdata.serve", "+preset=test", "generator.source=synthetic", "generator.state_dir=null",
         "server.port=0", "server.log_file=null", f"server.ready_file={work}/ready.json", "buffer.size=2000"],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env=CLEAN_ENV)
    try:
        reader = f"""
            import importlib.abc, json, sys, time
            class NoServerSide(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in {SERVER_SIDE!r}:
                        raise ImportError(f"{{name}} is not part of the base install")
            sys.meta_path.insert(0, NoServerSide())
            for _ in range(600):
                try:
                    url = json.load(open("ready.json"))["url"]
                    break
                except (OSError, ValueError):
                    time.sleep(0.1)
            from torch.utils.data import DataLoader
            from actdata import ActivationClient, RemoteActivationDataset
            client = ActivationClient(url)
            assert client.wait_for_data(200, timeout=60)
            batch = next(iter(DataLoader(RemoteActivationDataset(url, batch_size=256), batch_size=None)))
            print(tuple(batch.shape), client.get_stats()["capacity"])
        """
        out = run(py, work, reader, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split()[-1] == "2000" and "(256," in out.stdout
    finally:
        os.killpg(server.pid, 15)
        server.wait(30)


def test_the_checkout_is_not_needed_for_a_bad_config_line(wheel_env):
    _, py, work = wheel_env
    out = subprocess.run([str(py), "-m", "actdata.serve", "+preset=test", "buffer.size=-5"], cwd=work,
                         capture_output=True, text=True, timeout=120, env=CLEAN_ENV)
    assert out.returncode == 2 and "buffer.size" in out.stderr and "Traceback" not in out.stderr

