"""Image files on disk as preprocessing.py reads them: the files of a folder, decoding to RGB, the ADM center crop.

numpy and PIL are imported where they are used, so that preprocessing.py's --help answers at once.
"""
import os


def walk_files(folder):
    """Every regular file under folder (symlinked folders followed; sockets, pipes and broken links left out)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                yield from walk_files(entry.path)
            elif entry.is_file():
                yield entry.path


def image_files(folder):
    """Every file with an image extension under folder, sorted by its path relative to folder."""
    from PIL import Image

    Image.init()
    paths = [p for p in walk_files(folder) if os.path.splitext(p)[1].lower() in Image.EXTENSION]
    return sorted(paths, key=lambda p: os.path.relpath(p, folder).replace(os.sep, "/"))


def read_rgb(path):
    """Decode an image file to an (H, W, 3) uint8 array; returns (array, source mode)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        if mode.startswith("I;16"):
            # 16-bit grayscale: keep the high byte (Pillow's plain convert would clip everything above 255 to white).
            im = Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8))
        return np.asarray(im.convert("RGB")), mode


def center_crop_arr(arr, image_size):
    """ADM center crop: halve with a box filter while the short side >= 2*image_size, bicubic resize, crop."""
    import numpy as np
    from PIL import Image

    pil_image = Image.fromarray(arr)
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]
