"""Just enough ELF reading to say what a shared object links against, without loading it.

Loading native code runs its initialisers, and a bad build can take the whole host process down
with it (see ``torch_aoti.check_runtime_linkage``); reading the headers cannot.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

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


def read(data: bytes, symbols: Iterable[str] = ()) -> SharedObject:
    """Read a little-endian ELF64 file's DT_NEEDED list and which of ``symbols`` it defines.

    Both the dynamic and the full symbol table are searched. ``ValueError`` for anything that is
    not such a file, or is cut short.
    """
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise ValueError("not a little-endian 64-bit ELF file")
    wanted = {s.encode() + b"\0" for s in symbols}
    try:
        (shoff,) = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
        # sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, ...
        sections = [struct.unpack_from("<IIQQQQI", data, shoff + i * shentsize) for i in range(shnum)]
        needed: list[str] = []
        found: set[str] = set()
        for _, kind, _, _, offset, size, link in sections:
            if kind not in (_SHT_DYNAMIC, _SHT_SYMTAB, _SHT_DYNSYM):
                continue
            strings = memoryview(data)[sections[link][4] : sections[link][4] + sections[link][5]]
            if kind == _SHT_DYNAMIC:
                for pos in range(offset, offset + size, 16):
                    tag, value = struct.unpack_from("<qQ", data, pos)
                    if tag == _DT_NULL:
                        break
                    if tag == _DT_NEEDED:
                        needed.append(_cstring(strings, value))
            elif wanted:
                for pos in range(offset + _SYM_SIZE, offset + size, _SYM_SIZE):  # 0 is the null symbol
                    name, _, _, shndx = struct.unpack_from("<IBBH", data, pos)
                    if shndx != _SHN_UNDEF and name:
                        found.update(w[:-1].decode() for w in wanted if strings[name : name + len(w)] == w)
    except (struct.error, IndexError) as exc:
        raise ValueError(f"truncated or malformed ELF file: {exc}") from None
    return SharedObject(tuple(needed), frozenset(found))


def _cstring(table: memoryview, offset: int) -> str:
    raw = bytes(table[offset : offset + 4096])
    return raw[: raw.index(b"\0")].decode("latin-1") if b"\0" in raw else raw.decode("latin-1")
