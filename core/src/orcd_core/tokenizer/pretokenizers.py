"""Pre-tokenizer regexes per `tokenizer.ggml.pre`, as llama.cpp (src/llama-vocab.cpp,
`llm_tokenizer_bpe`) interprets them.

llama.cpp splits a text fragment by applying each regex of a list in turn to the pieces left by the
previous one; matched and unmatched stretches both become pieces (Hugging Face `Split` with behavior
"isolated"). The strings below are llama.cpp's, i.e. its std::regex-compatible rewrites of the
upstream `tokenizer.json` patterns (for example `(?:'[sS]|'[tT]|...)` instead of `(?i:'s|'t|...)`,
and gpt-4o's `((?=[\\p{L}])([^a-z]))*` instead of `[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*`), because
llama.cpp's behaviour is the contract. Oniguruma (the regex engine of `tokenizers`) evaluates them
with the same meaning as llama.cpp's collapsed-codepoint std::regex and its hand-written matchers,
with one syntax difference translated here: std::regex's `$` is the end of the fragment, which is
`\\z` in Oniguruma.

A name that is not in `PRE_TOKENIZERS` is a load error (`TokenizerError`), as in llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

# the GPT-2 pattern (llama.cpp's spelling, which omits the trailing `|\s+`; its matcher and an
# isolated split give the same pieces either way)
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DEEPSEEK_LLM_LETTERS = (  # written as escapes: the ranges must survive any Unicode normalization
    "A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    "\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f"
    "\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d"
    "\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK3 = (
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BLOOM = r" ?[^(\s|.,!?" "\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c" ")]+"

REGEX_SETS: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    "llama3": (LLAMA3,),
    "deepseek-llm": (
        r"[\r\n]",
        r"\s?[" + _DEEPSEEK_LLM_LETTERS + r"]+",
        r"\s?[!-/:-~" "\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002" r"]+",
        r"\s+\z",
        _CJK,
        r"\p{N}+",
    ),
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+", _DEEPSEEK3),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", GPT2),
    "gpt2": (GPT2,),
    "qwen2": (QWEN2,),
    "qwen35": (QWEN35,),
    "bloom": (_BLOOM,),
    "chatglm4": (LLAMA3,),
    "viking": (_BLOOM, r"\p{N}"),
    "tekken": (TEKKEN,),
    "gpt4o": (GPT4O,),
    "bailingmoe": (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    ),
    "seed-coder": (
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "ufakzeka": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "minicpm5": (
        r"\p{N}{1,3}",
        _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp treats one `tokenizer.ggml.pre` value of a `gpt2` (byte-level BPE) vocabulary."""

    name: str  # the `tokenizer.ggml.pre` value
    regex_set: str  # key of REGEX_SETS
    ignore_merges: bool = False  # a piece that is a whole vocabulary token is taken as is
    clean_spaces: bool = True  # llama.cpp's detokenizer clean-up passes (we report it, see decode)
    add_bos: bool = False  # default of `add_bos_token` when the file does not say
    no_bos: bool = False  # llama.cpp forces bos to "none" (chatglm)

    @property
    def regexes(self) -> tuple[str, ...]:
        return REGEX_SETS[self.regex_set]


def _table() -> dict[str, PreTokenizer]:
    rows: list[PreTokenizer] = []

    def add(names: str, regex_set: str, **kw) -> None:
        for name in names.split():
            rows.append(PreTokenizer(name, regex_set, **kw))

    add("default", "default")
    add("minicpm5", "minicpm5", ignore_merges=True)
    add("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano", "llama3",
        ignore_merges=True, add_bos=True)
    add("deepseek-llm", "deepseek-llm", clean_spaces=False)
    add("deepseek-coder", "deepseek-coder", clean_spaces=False)
    add("deepseek-v3 hunyuan-dense hy_v4 joyai-llm", "deepseek-v3", clean_spaces=False)
    add("falcon", "falcon")
    add("mpt olmo", "gpt2")
    add("trillion granite-docling", "gpt2", clean_spaces=False)
    add("starcoder refact codeshell exaone minerva-7b mellum2", "starcoder")
    add("command-r smollm", "starcoder", clean_spaces=False)
    add("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert exaone4 jais",
        "gpt2")
    add("jina-v1-en jina-v2-code roberta-bpe", "gpt2")
    add("qwen2 deepseek-r1-qwen kormo f2llmv2 hunyuan solar-open", "qwen2", clean_spaces=False)
    add("megrez stablelm2", "qwen2")
    add("qwen35", "qwen35", clean_spaces=False)
    add("dbrx smaug-bpe", "llama3")
    add("poro-chat", "bloom", clean_spaces=False)
    add("bloom gpt3-finnish", "bloom")
    add("chatglm-bpe", "chatglm4", no_bos=True)
    add("glm4 glm5", "chatglm4", no_bos=True, ignore_merges=True)
    add("viking", "viking", clean_spaces=False)
    add("tekken", "tekken", clean_spaces=False, ignore_merges=True, add_bos=True)
    add("gpt-4o llama4 kanana2 talkie minimax-m2", "gpt4o", clean_spaces=False)
    add("bailingmoe bailingmoe2 llada-moe", "bailingmoe", clean_spaces=False)
    add("seed-coder", "seed-coder", clean_spaces=False)
    add("ufakzeka", "ufakzeka", clean_spaces=False)
    add("grok-2", "qwen2", clean_spaces=False)
    return {row.name: row for row in rows}


PRE_TOKENIZERS: dict[str, PreTokenizer] = _table()

# llama.cpp knows these names but needs matchers that a regex split cannot express (custom digit
# grouping, whitespace-escaped BPE without byte encoding, k-mer vocabularies); we refuse them by name
UNSUPPORTED_PRE = {
    "kimi-k2": "needs llama.cpp's custom Han/letter matcher",
    "afmoe": "needs llama.cpp's custom digit grouping",
    "tiny_aya": "needs llama.cpp's custom digit grouping",
    "cohere2moe": "needs llama.cpp's custom digit grouping",
    "superbpe": "uses an empty-match lookahead split",
    "gemma4": "is whitespace-escaped BPE without byte encoding",
    "granite-embed-multi-311m": "is whitespace-escaped BPE without byte encoding",
    "sarvam-moe": "is whitespace-escaped BPE without byte encoding",
    "whitespace": "is a whitespace-split vocabulary",
    "chameleon": "uses image and sentinel token patterns",
    "youtu": "is not supported yet",
    "spark2_5": "is not supported yet",
    "jais-2": "is not supported yet",
    "granite-embed-multi-97m": "is not supported yet",
    "laguna": "is not supported yet",
    "exaone-moe": "is not supported yet",
}
