"""Image batches in .npz files (generate.py's samples, the ADM reference batches), read a batch at a time."""
import zipfile
from pathlib import Path

import numpy as np

from utils.errors import UserError


class NpzImages:
    """The uint8 (N, H, W, 3) image array of an .npz, read a batch at a time.

    Memory-mapped when the array is stored uncompressed (np.savez, as generate.py and the ADM reference batches);
    streamed through zlib when compressed (np.savez_compressed). Errors name the file.
    """

    def __init__(self, path, key="arr_0"):
        self.path, self.key = Path(path), key
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            with zipfile.ZipFile(self.path) as archive:
                names = [name.removesuffix(".npy") for name in archive.namelist()]
                if key not in names:
                    raise UserError(f"{path} has no '{key}' array (it holds {', '.join(names) or 'nothing'}): "
                                     "expected an .npz with uint8 images under arr_0, as generate.py writes")
                info = archive.getinfo(f"{key}.npy")
                with archive.open(info) as member:
                    self.shape, dtype = self._read_header(member)
                    header_size = member.tell()
        except zipfile.BadZipFile:
            raise UserError(f"{path} is no .npz file") from None
        if dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] != 3:
            raise UserError(f"{path}: '{key}' is {dtype} {self.shape}; expected uint8 images (N, H, W, 3)")
        self.memmap = None
        if info.compress_type == zipfile.ZIP_STORED:
            self.memmap = np.memmap(self.path, dtype=np.uint8, mode="r", shape=self.shape,
                                    offset=self._data_offset(info) + header_size)

    def _read_header(self, member):
        """(shape, dtype) from the header of the .npy stream `member`, leaving it at the data."""
        version = np.lib.format.read_magic(member)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise UserError(f"{self.path}: unsupported .npy format version {version} for '{self.key}'")
        shape, fortran_order, dtype = read_header[version](member)
        if fortran_order:
            raise UserError(f"{self.path}: '{self.key}' is Fortran-ordered; save it with np.savez from a C array")
        return shape, dtype

    def _data_offset(self, info):
        """Byte offset of a stored member's data: after its 30-byte local header, file name and extra field."""
        with open(self.path, "rb") as f:
            f.seek(info.header_offset + 26)
            name_length, extra_length = np.frombuffer(f.read(4), dtype="<u2")
        return info.header_offset + 30 + int(name_length) + int(extra_length)

    def __len__(self):
        return self.shape[0]

    @property
    def resolution(self):
        """The images' height in pixels (the side of square images)."""
        return self.shape[1]

    def batches(self, batch_size):
        """Yield uint8 (b, H, W, 3) arrays of at most batch_size images, in order."""
        if self.memmap is not None:
            for start in range(0, len(self), batch_size):
                yield np.array(self.memmap[start:start + batch_size])
            return
        image_bytes = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{self.key}.npy") as member:
            self._read_header(member)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                data = np.frombuffer(member.read(count * image_bytes), dtype=np.uint8)
                yield data.reshape(count, *self.shape[1:]).copy()
