"""bertforge: BERT-family pretraining (data_prep + pretrain packages).

``pip install .`` is the light install: what ``python -m data_prep`` needs on a CPU-only prep node,
without torch or DeepSpeed.  ``[train]`` adds the training stack (``python -m pretrain``); ``[mpi]``
is ``[train]`` plus mpi4py; ``[trackers]`` the MLflow and W&B clients that ``logging.trackers`` uses;
``[dev]`` is ``[train]`` plus the trackers and the test tools (``make install`` installs ``.[dev,mpi]``:
everything).

The CUDA extension in csrc/ is optional.  Switch ``BERTFORGE_CUDA_EXT``:
  unset  build it when a CUDA build of torch and nvcc are both present, else skip quietly;
  1      build it, and fail if that is impossible;
  0      never build it (CPU-only install; ops fall back to their PyTorch references).
Architectures: ``TORCH_CUDA_ARCH_LIST`` when set, else sm_80 and sm_90.
Build the extension with ``pip install --no-build-isolation`` so it sees the installed torch.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# data_prep's imports (tests/data_prep/test_light_install.py checks them against this list).
DATA_PREP = ["pyyaml>=6.0", "numpy>=1.24", "tokenizers>=0.15", "jieba>=0.42", "zstandard>=0.21", "tqdm>=4.60",
             "fsspec>=2023.1"]
TRAIN = ["torch>=2.4", "deepspeed>=0.16", "tensorboard>=2.14", "matplotlib>=3.7"]
# logging.trackers (pretrain/trackers.py); mlflow-skinny: the client without the server and its SQL/pandas stack
TRACKERS = ["mlflow-skinny>=3.0", "wandb>=0.19"]
DEFAULT_GENCODE = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]


def _cuda_extension():
    """Return ([ext_modules], cmdclass) for csrc/, or ([], {}) when it is not to be built."""
    switch = os.environ.get("BERTFORGE_CUDA_EXT", "").strip()
    if switch == "0":
        return [], {}
    required = switch == "1"
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        reason = "torch is not importable in the build environment (use --no-build-isolation)"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU-only build"
        elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            reason = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if reason is None and not sources:
        reason = "csrc/ holds no sources"
    if reason is not None:
        if required:
            raise RuntimeError(f"BERTFORGE_CUDA_EXT=1 but the CUDA extension cannot be built: {reason}")
        print(f"bertforge: skipping the CUDA extension ({reason}); ops use their PyTorch references")
        return [], {}
    nvcc_flags = ["-O3", "--use_fast_math", "-std=c++17", "-lineinfo"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        nvcc_flags += DEFAULT_GENCODE
    ext = CUDAExtension(
        name="bertforge_C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
CONFIG_PACKAGES = ["bertforge_configs"] + [f"bertforge_configs.{d}" for d in sorted(os.listdir(os.path.join(HERE, "configs")))
                                           if os.path.isdir(os.path.join(HERE, "configs", d))]

setup(
    name="bertforge",
    version="0.1.0",
    description="Pretrain BERT-family encoders: data_prep to WebDataset shards, DeepSpeed ZeRO training",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ ships as the data-only package bertforge_configs: `--config bert-base` finds it installed
    packages=find_packages(include=["pretrain", "pretrain.*", "data_prep", "data_prep.*"]) + CONFIG_PACKAGES,
    package_dir={"bertforge_configs": "configs"},
    package_data={"pretrain": ["py.typed"], "data_prep": ["assets/*"], **{p: ["*.yaml"] for p in CONFIG_PACKAGES}},
    install_requires=DATA_PREP,
    extras_require={
        "train": TRAIN,
        "mpi": TRAIN + ["mpi4py>=4.0"],   # the 4.x wheels load any MPI library at run time
        "trackers": TRACKERS,
        # webdataset: the tests read our shards with stock webdataset.WebDataset; scipy, scikit-learn:
        # the references tests/finetune checks the fine-tuning metrics against (pretrain never imports them)
        "dev": TRAIN + TRACKERS + ["pytest>=7.4", "transformers>=4.40", "webdataset>=0.2.90", "scipy>=1.10",
                        "scikit-learn>=1.3", "accelerate>=1.0"],
    },
    entry_points={
        "console_scripts": [
            "bertforge-pretrain=pretrain.cli:main",
            "bertforge-data-prep=data_prep.cli:main",
        ]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
