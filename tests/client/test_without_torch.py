"""The client must work where torch is not installed: prove it with torch made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests._support.servers import CAT_JPEG

SCRIPT = textwrap.dedent(
    """
    import sys

    class NoTorch:
        '''Makes `import torch` (and torchvision) fail as on a client-only install.'''

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"No module named {name!r} (hidden for this test)")
            return None

    sys.meta_path.insert(0, NoTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker did not work")

    import numpy as np
    import camserve.client
    from camserve.client import cli, loadtest  # noqa: F401
    from camserve.client.render import overlay

    picture = overlay(sys.argv[1], np.eye(7, dtype=np.float32), colormap="turbo")
    assert picture.size == (451, 300), picture.size
    assert "torch" not in sys.modules
    print("ok", camserve.client.Client.__name__)
    """
)


def test_client_imports_and_renders_without_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(CAT_JPEG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok Client"
