from setuptools import find_packages, setup


def _reqs(path):
  with open(path) as f:
    return [l.strip() for l in f if l.strip() and not l.startswith(("#", "-r"))]


# Every command-line tool, also runnable as `python -m blip2_jax.<module>`.
COMMANDS = {
    "blip2-caption": "blip2_jax.cli.caption:main",
    "blip2-vqa": "blip2_jax.cli.vqa:main",
    "blip2-retrieve": "blip2_jax.cli.retrieve:main",
    "blip2-evaluate": "blip2_jax.cli.evaluate:main",
    "blip2-parity": "blip2_jax.cli.parity:main",
    "blip2-train": "blip2_jax.cli.train:main",
    "blip2-finetune": "blip2_jax.cli.finetune:main",
    "blip2-demo": "blip2_jax.cli.demo:main",
    "blip2-aot": "blip2_jax.cli.aot:main",
    "blip2-convert": "blip2_jax.cli.convert:main",
}

# What `python -m blip2_jax.demo` needs beyond the runtime: torch (its random ViT and the GGUF
# conversion, the CPU wheel the test extras pin), scikit-image (the photos), matplotlib (summary.png),
# gguf and accelerate (transformers' GGUF loader). Its towers install with --no-deps (README): their own
# requirements pin runtimes the demo does not use.
DEMO = ["torch==2.13.0", "scikit-image", "matplotlib>=3.8", "gguf", "accelerate"]

setup(
    name="blip2-jax",
    version="0.1.0",
    description="BLIP-2 in JAX/Flax: Hugging Face-compatible models, training and inference",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    # configs/ stays at the top of the repository; installed, the recipes are the package
    # blip2_jax.configs (blip2_jax.core.recipes finds them in either place).
    packages=find_packages(include=["blip2_jax", "blip2_jax.*"]) + ["blip2_jax.configs"],
    package_dir={"blip2_jax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=_reqs("requirements.txt"),
    extras_require={"test": [r for r in _reqs("requirements-test.txt") if r not in _reqs("requirements.txt")],
                    "demo": DEMO},
    entry_points={"console_scripts": [f"{name} = {target}" for name, target in COMMANDS.items()]},
)
