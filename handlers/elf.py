"""Just enough ELF reading to say what a shared object links against, without loading it.

Loading native code runs its initialisers, and a bad build can take the whole host process down
with it (see ``torch_aoti.check_runtime_linkage``); reading the headers cannot.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

_SHT_DYNAMIC, _SHT_SYMTAB, _SHT_DYNSYM = 6, 2, 11
_DT_NULL, _DT_NEEDED = 0, 1
_SHN_UNDEF = 0
_SYM_SIZE = 24  # Elf64_Sym


@dataclass(frozen=True)
class SharedObject:
    """``needed``: the libraries it names (DT_NEEDED), in order; ``defines``: those of the
    symbols asked about that it defines itself."""

    needed: tuple[str, ...]
    defines: frozenset[str]


def read(source: bytes | BinaryIO, symbols: Iterable[str] = ()) -> SharedObject:
    """Read a little-endian ELF64 file's DT_NEEDED list and which of ``symbols`` it defines.

    ``source``: the bytes, or a seekable binary file (a zip member): only the headers, the
    dynamic section, the symbol tables and their strings are read, not the code or the weights
    an AOTInductor wrapper may embed. ``ValueError`` for anything that is not such a file, or is
    cut short.
    """
    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    wanted = {s.encode() + b"\0" for s in symbols}

    def chunk(offset: int, size: int) -> bytes:
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ValueError("truncated or malformed ELF file")
        return data

    header = f.read(64)
    if header[:4] != b"\x7fELF" or header[4:6] != b"\x02\x01" or len(header) < 64:
        raise ValueError("not a little-endian 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", header, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", header, 0x3A)
    table = chunk(shoff, shentsize * shnum)
    try:
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link
        sections = [struct.unpack_from("<IIQQQQI", table, i * shentsize) for i in range(shnum)]
        needed: list[str] = []
        found: set[str] = set()
        for _, kind, _, _, offset, size, link in sections:
            if kind not in (_SHT_DYNAMIC, _SHT_SYMTAB, _SHT_DYNSYM) or (kind != _SHT_DYNAMIC and not wanted):
                continue
            data = chunk(offset, size)
            strings = chunk(sections[link][4], sections[link][5])
            if kind == _SHT_DYNAMIC:
                for pos in range(0, size - 15, 16):
                    tag, value = struct.unpack_from("<qQ", data, pos)
                    if tag == _DT_NULL:
                        break
                    if tag == _DT_NEEDED:
                        needed.append(_cstring(strings, value))
                continue
            for pos in range(_SYM_SIZE, size - _SYM_SIZE + 1, _SYM_SIZE):  # 0 is the null symbol
                name, _, _, shndx = struct.unpack_from("<IBBH", data, pos)
                if shndx != _SHN_UNDEF and name:
                    found.update(w[:-1].decode() for w in wanted if strings[name : name + len(w)] == w)
    except (struct.error, IndexError) as exc:
        raise ValueError(f"truncated or malformed ELF file: {exc}") from None
    return SharedObject(tuple(needed), frozenset(found))


def _cstring(table: bytes, offset: int) -> str:
    end = table.find(b"\0", offset)
    return table[offset : end if end >= 0 else len(table)].decode("latin-1")
