"""Evaluation text: the offline Wikipedia text, a local file, or WikiText-2 from the Hub.

    text = wiki_text()                 # ~2.8M characters of real English Wikipedia, offline
    text = load_text("my.txt")
    text = wikitext2()                 # WikiText-2 raw test split (the file llama.cpp uses)

wiki_text(): scripts/setup.sh keeps the gensim wheel (not installed) in .cache/wheels; it ships
a real English Wikipedia dump (`enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`,
CC BY-SA, 2016) as a test file. We read it out of the wheel with zipfile + bz2 and turn the
MediaWiki markup into plain article text with the deterministic cleaning of `clean_wikitext`
(documented there and in docs/quality.md). The result depends only on the wheel's bytes.

wikitext2(): the raw WikiText-2 test split. Default source "raw": `wikitext-2-raw-v1.zip` of
the Hub dataset repo `ggml-org/ci` (the archive llama.cpp's scripts fetch), whose
`wikitext-2-raw/wiki.test.raw` is the exact text llama-perplexity is run on; stdlib only.
Source "parquet": `Salesforce/wikitext`'s `wikitext-2-raw-v1/test-00000-of-00001.parquet`,
read with pyarrow (not a kbit dependency: used only when importable), rows joined with "\\n\\n"
as in transformers' perplexity guide. The two strings differ in whitespace, so their
perplexities are not interchangeable; results record which one was used.
"""
from __future__ import annotations

import bz2
import html
import io
import os
import re
import zipfile
from pathlib import Path
from xml.etree import ElementTree

from kbitcli.errors import InputError, UsageError

GENSIM_WHEEL_GLOB = "gensim-4.4.0-*.whl"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_NAME = "enwiki-2016 (gensim 4.4.0 test data, 106 articles, CC BY-SA)"

WIKITEXT2_RAW = {"repo_id": "ggml-org/ci", "filename": "wikitext-2-raw-v1.zip",
                 "member": "wikitext-2-raw/wiki.{split}.raw"}
WIKITEXT2_PARQUET = {"repo_id": "Salesforce/wikitext",
                     "filename": "wikitext-2-raw-v1/{split}-00000-of-00001.parquet"}

# Sections that hold lists of sources and links, not prose: dropped with everything under them.
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                  "sources", "footnotes", "citations", "notes and references", "works cited", "gallery"}
# Link namespaces whose links are not running text (images, categories, other languages...).
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|wikt|wiktionary|commons|[a-z]{2,3}(-[a-z]+)?)\s*:",
                        re.I)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """KBIT_CACHE, else the repository's .cache (where scripts/setup.sh puts the wheel)."""
    env = os.environ.get("KBIT_CACHE")
    return Path(env).expanduser() if env else repo_root() / ".cache"


def _gensim_wheel() -> Path:
    for folder in (cache_dir() / "wheels", cache_dir(), repo_root() / ".cache" / "wheels"):
        found = sorted(folder.glob(GENSIM_WHEEL_GLOB)) if folder.is_dir() else []
        if found:
            return found[-1]
    raise InputError(f"the offline Wikipedia text is missing: no {GENSIM_WHEEL_GLOB} in {cache_dir() / 'wheels'} "
                     "(set KBIT_CACHE to the folder that holds wheels/); run scripts/setup.sh, which downloads it")


def wiki_xml() -> str:
    """The raw MediaWiki XML dump inside the gensim wheel."""
    wheel = _gensim_wheel()
    try:
        with zipfile.ZipFile(wheel) as z:
            return bz2.decompress(z.read(WIKI_MEMBER)).decode("utf-8")
    except (zipfile.BadZipFile, KeyError, OSError, EOFError, ValueError) as e:
        raise InputError(f"{wheel} is not a usable gensim wheel ({e}); delete it and run scripts/setup.sh") from None


_WIKI_CACHE: dict[str, str] = {}


def wiki_text() -> str:
    """Plain text of the articles of the Wikipedia dump: '= Title =' then paragraphs separated by
    blank lines, articles separated by blank lines. Deterministic; cached per process."""
    if "text" not in _WIKI_CACHE:
        _WIKI_CACHE["text"] = wiki_articles_text(wiki_xml())
    return _WIKI_CACHE["text"]


def wiki_articles_text(xml: str) -> str:
    """Every main-namespace, non-redirect page of a MediaWiki XML export, cleaned (clean_wikitext)."""
    root = ElementTree.fromstring(xml)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    out = []
    for page in root.iter(f"{ns}page"):
        if (page.findtext(f"{ns}ns") or "0").strip() != "0" or page.find(f"{ns}redirect") is not None:
            continue
        title = (page.findtext(f"{ns}title") or "").strip()
        raw = page.findtext(f"{ns}revision/{ns}text") or ""
        if raw.lstrip().upper().startswith("#REDIRECT"):
            continue
        body = clean_wikitext(raw)
        if body:
            out.append(f"= {title} =\n\n{body}")
    return "\n\n".join(out) + "\n"


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) open_ ... close span; an unclosed span runs to the end."""
    out, depth, i, n = [], 0, 0, len(text)
    lo, lc = len(open_), len(close)
    start = 0
    while i < n:
        if text.startswith(open_, i):
            if depth == 0:
                out.append(text[start:i])
            depth += 1
            i += lo
        elif depth and text.startswith(close, i):
            depth -= 1
            i += lc
            if depth == 0:
                start = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


_MEDIA_LINK = re.compile(r"\[\[\s*:?\s*(file|image|category|media)\s*:", re.I)


def _strip_media_links(text: str) -> str:
    """Remove [[File:...]], [[Image:...]], [[Category:...]] links whole, counting nested [[ ]]
    (their captions hold links, and sometimes lone brackets)."""
    out, pos = [], 0
    while (m := _MEDIA_LINK.search(text, pos)) is not None:
        out.append(text[pos:m.start()])
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
            else:
                i += 1
        pos = i
    out.append(text[pos:])
    return "".join(out)


def _link(m: re.Match) -> str:
    inner = m.group(1)
    if _DROP_LINK.match(inner):
        return ""
    target, _, label = inner.partition("|")
    return (label if label else target).strip() if "|" in inner else target.strip()


def clean_wikitext(raw: str) -> str:
    """MediaWiki markup -> plain paragraphs, in this order:
    1. drop HTML comments, <ref>...</ref> / <ref/>, and <math>, <gallery>, <timeline>, <score>,
       <syntaxhighlight>, <source>, <imagemap> elements with their content;
    2. drop templates {{...}} and tables {|...|} (nested; an unclosed one runs to the end);
    3. internal links: [[File:...]], [[Image:...]], [[Category:...]] dropped whole (nested links
       in their captions too), interlanguage and other namespace links dropped,
       [[target|label]] -> label, [[target]] -> target (innermost first); external
       [url label] -> label, bare [url] dropped;
    4. remaining HTML tags removed (their text kept), entities unescaped (&nbsp; -> space);
       bold/italic quotes removed; magic words (__TOC__...) removed;
    5. line by line: headings '== X ==' start a section, and the sections References, External
       links, See also, Further reading, Notes, Bibliography, Sources, ... are dropped whole; list
       and indent markers (* # : ;) stripped; lines with no letter, or starting with '|' or '!'
       (table remnants) dropped; spaces collapsed;
    6. consecutive lines joined into paragraphs, paragraphs separated by one blank line.
    """
    t = re.sub(r"<!--.*?(-->|$)", "", raw, flags=re.S)
    t = re.sub(r"<ref[^>]*/\s*>", "", t, flags=re.I)
    t = re.sub(r"<ref[^>]*>.*?</ref\s*>", "", t, flags=re.I | re.S)
    t = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|hiero)\b[^>]*>.*?</\1\s*>",
               "", t, flags=re.I | re.S)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    t = _strip_media_links(t)
    prev = None
    while prev != t:  # innermost links first
        prev = t
        t = re.sub(r"\[\[([^\[\]]*)\]\]", _link, t)
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[(?:https?:)?//[^\s\]]*\]", "", t)
    t = re.sub(r"<[^<>\n]*>", "", t)
    t = html.unescape(t).replace("\u00a0", " ")
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"__[A-Z]+__", "", t)

    paragraphs: list[str] = []
    current: list[str] = []
    dropping = False

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for line in t.split("\n"):
        s = line.strip()
        h = re.match(r"^(={2,6})\s*(.*?)\s*\1$", s)
        if h:
            flush()
            title = h.group(2).strip()
            dropping = title.lower() in _DROP_SECTIONS
            if not dropping and re.search(r"[^\W\d_]", title):
                paragraphs.append(title)
            continue
        if dropping:
            continue
        if not s:
            flush()
            continue
        if s[0] in "|!":
            continue
        s = re.sub(r"^[*#:;]+\s*", "", s)
        s = re.sub(r"\s+", " ", s).strip()
        s = re.sub(r"\(\s*[,;]?\s*\)", "", s).replace(" ,", ",").replace(" .", ".")  # '()' left by dropped templates
        if not re.search(r"[^\W\d_]", s):
            continue
        current.append(s.strip())
    flush()
    return "\n\n".join(p for p in paragraphs if p)


def load_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a BOM is dropped); InputError names the problem."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{p} is a folder; give a text file") from None
    except OSError as e:
        raise InputError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{p} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise InputError(f"{p} is empty")
    return text


def _hf_download(repo_id: str, filename: str, endpoint: str | None) -> Path:
    """One file of a Hub dataset repo through huggingface_hub's cache (HF_HUB_OFFLINE: cache only);
    Hub failures become one HubError line."""
    from kbitcli.hub import _hub_errors, _progress_bars, hub_cache_dir, hub_endpoint, hub_offline
    ep, cache, offline = hub_endpoint(endpoint), hub_cache_dir(), hub_offline()
    with _hub_errors(repo_id=repo_id, revision=None, endpoint=ep, cache_dir=cache, offline=offline), \
            _progress_bars(False):
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(repo_id=repo_id, repo_type="dataset", filename=filename, cache_dir=cache,
                                    endpoint=ep, local_files_only=offline))


def wikitext2(split: str = "test", source: str = "raw", endpoint: str | None = None) -> str:
    """The WikiText-2 (raw) text of `split` ("test", "valid"/"validation" or "train").

    source "raw": wiki.{split}.raw from ggml-org/ci's wikitext-2-raw-v1.zip, verbatim (what
    llama-perplexity reads). source "parquet": Salesforce/wikitext's parquet file, rows joined
    with "\\n\\n" (transformers' perplexity guide); needs pyarrow."""
    split = {"validation": "valid", "val": "valid", "dev": "valid"}.get(split, split)
    if split not in ("test", "valid", "train"):
        raise UsageError(f"unknown WikiText-2 split {split!r}; choose test, valid or train")
    if source == "raw":
        path = _hf_download(WIKITEXT2_RAW["repo_id"], WIKITEXT2_RAW["filename"], endpoint)
        member = WIKITEXT2_RAW["member"].format(split=split)
        try:
            with zipfile.ZipFile(path) as z:
                return z.read(member).decode("utf-8")
        except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError) as e:
            raise InputError(f"{path} (from {WIKITEXT2_RAW['repo_id']}) has no readable {member} ({e})") from None
    if source == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError("the parquet WikiText-2 (Salesforce/wikitext) needs pyarrow, which is not installed; "
                             "install pyarrow, or use the raw text (--dataset wikitext-2)") from None
        pq_split = "validation" if split == "valid" else split
        path = _hf_download(WIKITEXT2_PARQUET["repo_id"], WIKITEXT2_PARQUET["filename"].format(split=pq_split),
                            endpoint)
        try:
            rows = pq.read_table(io.BytesIO(path.read_bytes()), columns=["text"]).column("text").to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises its own types
            raise InputError(f"{path} is not a readable WikiText parquet file ({e})") from None
        return "\n\n".join(rows)
    raise UsageError(f"unknown WikiText-2 source {source!r}; choose raw or parquet")


DATASETS = ("wiki", "wikitext-2", "wikitext-2-parquet")


def dataset_text(name: str) -> tuple[str, str]:
    """(text, description) for a --dataset name."""
    if name == "wiki":
        return wiki_text(), WIKI_NAME
    if name == "wikitext-2":
        return wikitext2(source="raw"), "WikiText-2 raw test (ggml-org/ci wikitext-2-raw-v1.zip: wiki.test.raw)"
    if name == "wikitext-2-parquet":
        return wikitext2(source="parquet"), "WikiText-2 raw test (Salesforce/wikitext parquet, rows joined by \\n\\n)"
    raise UsageError(f"unknown dataset {name!r}; choose {', '.join(DATASETS)}")
