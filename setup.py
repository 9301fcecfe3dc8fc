from setuptools import find_packages, setup


def _reqs(path):
  with open(path) as f:
    return [l.strip() for l in f if l.strip() and not l.startswith(("#", "-r"))]


setup(
    name="blip2-jax",
    version="0.1.0",
    description="BLIP-2 in JAX/Flax: Hugging Face-compatible models, training and inference",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["blip2_jax", "blip2_jax.*"]),
    python_requires=">=3.10",
    install_requires=_reqs("requirements.txt"),
    extras_require={"test": [r for r in _reqs("requirements-test.txt") if r not in _reqs("requirements.txt")]},
)
