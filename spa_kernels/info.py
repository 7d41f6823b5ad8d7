"""`python -m spa_kernels.info`: versions, what was compiled (and for which CUDA archs), which implementations are
usable in this process and why any is not."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

import torch

from . import __version__, _dispatch, _ext


def _version(name: str) -> str:
    """The installed distribution's version (without importing it); "not installed" when absent."""
    try:
        return importlib.metadata.version(name.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
    try:
        cpu_cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001
        cpu_cap = "?"
    return {
        "spa_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "trl": _version("trl"),
        "liger_kernel": _version("liger_kernel"),
        "cpu_capability": cpu_cap,
        "devices": devices,
        "extension": _ext.build_info(),
        "build_status": _ext.build_status(),
        "impls": {name: _dispatch.impl_unavailable_reason(name) or "usable" for name in _dispatch.IMPLS},
    }


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    if "--json" in argv:
        print(json.dumps(info, indent=2))
        return 0
    ext = info["extension"]
    print(f"spa_kernels {info['spa_kernels']}  python {info['python']}  torch {info['torch']} "
          f"(CUDA {info['torch_cuda']})  triton {info['triton']}")
    print(f"transformers {info['transformers']}  trl {info['trl']}  liger-kernel {info['liger_kernel']}")
    print(f"platform {info['platform']}  CPU capability {info['cpu_capability']}")
    print(f"devices: {', '.join(info['devices']) or 'no CUDA device'}")
    if "import_error" in ext:
        print(f"spa_kernels._C: not importable ({ext['import_error']})")
    else:
        print(f"spa_kernels._C: built against torch {ext.get('torch_version')}; CPU kernels: "
              f"{'yes (' + ext.get('cpu_capability', '') + ')' if ext.get('cpu') else 'no'}; CUDA kernels: "
              f"{'yes, CUDA ' + ext.get('cuda_version', '') + ', archs ' + ext.get('cuda_archs', '') if ext.get('cuda') else 'no'}")
    for part, why in info["build_status"].get("skipped", {}).items():
        print(f"  build skipped {part}: {why}")
    for part, err in info["build_status"].get("failed", {}).items():
        print(f"  build failed {part}: {err.splitlines()[-1] if err else ''}")
    print("implementations:")
    for name, state in info["impls"].items():
        print(f"  {name:7s} {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
