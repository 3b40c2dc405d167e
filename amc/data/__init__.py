"""amc.data: real datasets and a real pretrained network, all available without network access.

- digits (scikit-learn, zero set-up): :func:`digits_loaders`, :func:`digits_datasets`
- Fashion-MNIST (Debian ``dataset-fashion-mnist``): :func:`fashion_mnist_loaders`, :func:`read_idx`
- CIFAR-10/100 and ImageFolder trees already on disk: :func:`cifar_loaders`, :func:`imagefolder_loaders`
- ImageNet MobileNetV2 + natural photos: :func:`pretrained_mobilenet_v2`, :func:`photo_crops`, :func:`photo_split`
- English sentences from the stdlib docstrings (text models): :func:`text_sentences`
"""
from .cifar import CIFAR10, CIFAR100, cifar_datasets, cifar_default_transforms, cifar_loaders
from .digits import digits_datasets, digits_loaders
from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    fashion_mnist_datasets,
    fashion_mnist_loaders,
    read_fashion_mnist,
)
from .idx import parse_idx, read_idx, write_idx
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, imagefolder_datasets, imagefolder_loaders, imagenet_default_transforms
from .photos import (
    IMAGENET_CAT_CLASSES,
    PHOTO_NAMES,
    load_photos,
    mobilenet_v2_weights_path,
    photo_center_crop,
    photo_crops,
    photo_split,
    pretrained_mobilenet_v2,
)
from .text import TEXT_MODULES, split_sentences, text_sentences, text_split_sizes

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "IMAGENET_CAT_CLASSES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PHOTO_NAMES",
    "cifar_datasets",
    "cifar_default_transforms",
    "cifar_loaders",
    "digits_datasets",
    "digits_loaders",
    "fashion_mnist_datasets",
    "fashion_mnist_loaders",
    "imagefolder_datasets",
    "imagefolder_loaders",
    "imagenet_default_transforms",
    "load_photos",
    "mobilenet_v2_weights_path",
    "parse_idx",
    "photo_center_crop",
    "photo_crops",
    "photo_split",
    "pretrained_mobilenet_v2",
    "read_fashion_mnist",
    "read_idx",
    "write_idx",
    "TEXT_MODULES",
    "split_sentences",
    "text_sentences",
    "text_split_sizes",
]
