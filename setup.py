"""kneetf: one knee X-ray in, a 3D knee MRI out (Keras / TensorFlow)."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
version: dict = {}
exec((HERE / "kneetf" / "version.py").read_text(), version)

setup(
    name="kneetf",
    version=version["__version__"],
    description="Reconstruct a 3D knee MRI from one knee X-ray (Keras 3 / TensorFlow 2.21)",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["kneetf", "kneetf.*"]),
    include_package_data=True,
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.12,<4",
        "tensorboard>=2.20",
        "numpy>=1.26",
        "scipy>=1.11",
        "pydicom>=3.0",
        "pylibjpeg>=2.0",
        "pylibjpeg-libjpeg>=2.1",
        "pylibjpeg-openjpeg>=2.3",
        "pylibjpeg-rle>=2.0",
        "nibabel>=5.2",
        "opencv-python-headless>=4.9",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorflow-serving-api==2.21.*",
        "grpcio>=1.60",
        "ai-edge-litert>=1.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "scikit-image>=0.22",
            "highdicom>=0.28",  # reads the derived DICOM series back in the tests
            "dcm2niix>=1.0.20250506",  # the dcm2niix binary, converts it back in the tests
        ],
        "gdcm": ["python-gdcm>=3.0.24"],
    },
    entry_points={
        "console_scripts": [
            "kneetf=kneetf.cli.main:main",
            "kneetf-train=kneetf.cli.main:train_main",
        ]
    },
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Topic :: Scientific/Engineering :: Medical Science Apps.",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
