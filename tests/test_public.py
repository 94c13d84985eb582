"""The package's public surface: `actdata.__all__`, imported lazily."""
import subprocess
import sys

import actdata


def test_every_public_name_resolves_and_is_listed():
    from actdata.reading.client import ActivationClient
    from actdata.reading.dataset import RemoteActivationDataset

    assert actdata.RemoteActivationDataset is RemoteActivationDataset
    assert actdata.ActivationClient is ActivationClient
    for name in actdata.__all__:
        assert getattr(actdata, name).__name__ == name
    assert issubclass(actdata.ServerUnavailable, actdata.ActivationServerError)
    assert issubclass(actdata.NotADirectory, actdata.ActivationServerError)
    assert set(actdata.__all__) <= set(dir(actdata))


def test_import_actdata_loads_neither_torch_nor_the_server_nor_lightning():
    code = ("import sys, actdata; from actdata.client import ActivationClient; "
            "from actdata import RemoteActivationDataset; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'litserve', 'fastapi', 'uvicorn', 'hydra', "
            "'transformers', 'lightning', 'pytorch_lightning'}), "
            "sorted(m for m in sys.modules if m.startswith(('actdata.serving', 'actdata.generation'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"
    bare = subprocess.run([sys.executable, "-c", "import sys, actdata; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert bare.stdout.strip() == "False"
