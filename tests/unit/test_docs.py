"""The documentation against the code: the generated reference pages are current, and every shell
command in README.md and docs/ names what exists (modules, configs, config keys, script flags,
extras), so a reader can paste it."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@lru_cache(maxsize=None)
def config_table():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- generated pages
@pytest.mark.parametrize("name", sorted(config_table().PAGES))
def test_reference_page_is_generated_from_the_current_code(name):
    page = ROOT / "docs" / name
    assert page.is_file(), f"docs/{name} is missing: run python scripts/config_table.py --write-docs"
    assert page.read_text(encoding="utf-8") == config_table().PAGES[name](), \
        f"docs/{name} is stale: run python scripts/config_table.py --write-docs"


def test_key_reference_pages_list_every_schema_key():
    from config.rl_schema import RLConfig
    from config.schema import SFTConfig

    for root, page in ((SFTConfig, "config-sft.md"), (RLConfig, "config-rl.md")):
        text = (ROOT / "docs" / "reference" / page).read_text(encoding="utf-8")
        listed = set(re.findall(r"^\| `([^`]+)`", text, re.M))
        keys = {key for key, _, _ in config_table().rows(root, {})}
        assert keys and keys <= listed, f"{page} lacks {sorted(keys - listed)}"


def _source_strings() -> tuple[set[str], str]:
    """String constants of trainer/ and workers/ that look like metric names, and all their text."""
    literal, text = set(), []
    for path in [*(ROOT / "trainer").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        source = path.read_text(encoding="utf-8")
        text.append(source)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and re.fullmatch(r"(train|val|timing|actor|critic|samples)/[a-z_]+", node.value):
                literal.add(node.value)
    return literal, "\n".join(text)


def test_metrics_page_lists_every_metric_the_code_logs_and_nothing_else():
    literal, source = _source_strings()
    listed = {name for name, _, _ in config_table().METRICS}
    # `<prefix>` is val (SFT validation) or samples (RL sample logging): the code reads those names too
    expanded = listed | {name.replace("<prefix>", p) for name in listed for p in ("val", "samples")}
    assert literal <= expanded, f"metrics logged but not in docs/reference/metrics.md: {sorted(literal - listed)}"
    for name in listed:
        # The name's last fixed part is written in the code (a literal, a dict key or an f-string's tail).
        tail = [part for part in name.split("/") if "<" not in part][-1]
        assert re.search(rf"[\"/]{re.escape(tail)}[\"/]", source), f"{name}: no '{tail}' in trainer/ or workers/"


def test_environment_page_names_only_variables_config_reads():
    source = (ROOT / "config" / "env.py").read_text(encoding="utf-8")
    for names, _ in config_table().OTHER_VARIABLES:
        for name in names.split(", "):
            assert f'"{name}"' in source, f"{name} is documented but config/env.py does not read it"


# ----------------------------------------------------------------------------- shell blocks
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELLS = {"bash", "sh", "shell", "console"}
TRAINERS = {"trainer.fsdp_sft_trainer": "sft", "trainer.rl_trainer": "rl"}
VERL_MODULES = {"verl.trainer.fsdp_sft_trainer": "sft", "verl.trainer.main_ppo": "rl"}  # "before" command lines
ARGPARSE_MODULES = {"trainer.export": "trainer/export.py", "trainer.report": "trainer/report/__main__.py"}
# Placeholders in synopsis lines: `[key=value ...]`, `[--dtype bf16]` (a bracket after a space).
PLACEHOLDER = re.compile(r"(?<=\s)\[[^\]\n]*\]")


def blocks(lang_filter):
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if lang_filter(m.group(1)):
                yield page, m.group(2)


def shell_blocks():
    return [(page.relative_to(ROOT).as_posix(), body) for page, body in blocks(lambda lang: lang in SHELLS)]


@lru_cache(maxsize=None)
def known_keys(kind: str) -> frozenset[str]:
    from config.rl_schema import RLConfig
    from config.schema import SFTConfig
    from config.verl import PPO_KEYS, PPO_SAME_NAME, SFT_KEYS

    if kind == "sft":
        ours, verl = config_table().rows(SFTConfig, {}), [e.key for e in SFT_KEYS]
    else:
        ours, verl = config_table().rows(RLConfig, {}), [e.key for e in PPO_KEYS] + list(PPO_SAME_NAME)
    return frozenset([key for key, _, _ in ours] + verl)


def key_exists(key: str, kind: str) -> bool:
    keys = known_keys(kind)
    parts = key.split(".")
    # a dict-valued key takes sub-keys (data.apply_chat_template_kwargs.enable_thinking)
    return any(".".join(parts[:i]) in keys for i in range(len(parts), 0, -1))


@lru_cache(maxsize=None)
def extras() -> frozenset[str]:
    import tomllib

    return frozenset(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


@lru_cache(maxsize=None)
def flags(source: str) -> frozenset[str]:
    return frozenset(n for opt in config_table().argparse_options(ROOT / source) for n in opt["names"] if n.startswith("-"))


def yaml_files_in(page_text: str) -> set[str]:
    """Config files a page shows in full (a yaml block whose first line is `# DIR/NAME.yaml`)."""
    return {m.group(1) for m in re.finditer(r"^```yaml\n# ([\w./-]+\.yaml)", page_text, re.M)}


def commands(body: str):
    """Each command of a shell block as its tokens (continuations joined, comments dropped)."""
    text = PLACEHOLDER.sub(" ", body.replace("\\\n", " "))
    for line in text.splitlines():
        for part in re.split(r"&&|\|\||;|\|", line):
            tokens = shlex.split(part, comments=True)
            if tokens:
                yield tokens


def check_command(tokens: list[str], page_text: str) -> list[str]:
    problems = []
    if "..." in tokens or any(t.endswith("...") or t.startswith("...") for t in tokens):
        problems.append("a literal '...' cannot be pasted")
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", tokens[0]):
        tokens = tokens[1:]  # VAR=value before the command
    if tokens[:1] == ["env"]:
        tokens = tokens[1:]
        while tokens and tokens[0].startswith("-"):
            tokens = tokens[2:] if tokens[0] == "-u" else tokens[1:]
        while tokens and "=" in tokens[0]:
            tokens = tokens[1:]
    if tokens[:1] == ["srun"]:
        tokens = tokens[1:]
    if not tokens:
        return problems
    program, args = tokens[0], tokens[1:]
    if program == "pip" and args[:1] == ["install"]:
        for arg in args:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
            if m:
                unknown = set(m.group(1).split(",")) - extras()
                problems += [f"pip extra {e!r} is not in pyproject.toml" for e in sorted(unknown)]
        return problems
    if program not in {"python", "python3", "torchrun"}:
        return problems  # grep, mkdocs, wandb, ...: not ours to check
    if program in {"python", "python3"} and args[:1] != ["-m"]:
        if args and args[0].endswith(".py"):
            script = args[0]
            if not (ROOT / script).is_file():
                return problems + [f"{script}: no such file"]
            known = flags(script)
            problems += [f"{script}: no option {a}" for a in args[1:] if a.startswith("--") and a.split("=")[0] not in known]
        return problems
    if "-m" not in args:
        return problems
    i = args.index("-m")
    module, rest = args[i + 1], args[i + 2:]
    if module in VERL_MODULES:
        kind = VERL_MODULES[module]
    elif module in TRAINERS:
        kind = TRAINERS[module]
    else:
        if module.split(".")[0] in {"trainer", "workers", "config"} and importlib.util.find_spec(module) is None:
            return problems + [f"python -m {module}: no such module"]
        if module in ARGPARSE_MODULES:
            known = flags(ARGPARSE_MODULES[module])
            problems += [f"{module}: no option {a}" for a in rest if a.startswith("--") and a.split("=")[0] not in known]
        elif importlib.util.find_spec(module) is None:
            problems.append(f"python -m {module}: no such module")
        return problems
    config_path, j = None, 0
    while j < len(rest):
        arg = rest[j]
        if arg in ("--config-path", "--config-name"):
            value = rest[j + 1]
            if arg == "--config-path":
                config_path = value
            elif config_path in (None, "config") and module in TRAINERS:
                if not (ROOT / "config" / f"{value}.yaml").is_file():
                    problems.append(f"--config-name {value}: no config/{value}.yaml")
            elif module in TRAINERS and f"{config_path}/{value}.yaml" not in yaml_files_in(page_text):
                problems.append(f"--config-path {config_path} --config-name {value}: the page does not show {config_path}/{value}.yaml")
            j += 2
            continue
        if "=" in arg and not arg.startswith("-"):
            key = arg.split("=", 1)[0].lstrip("+~")
            if not key_exists(key, kind):
                problems.append(f"{key}: not a key of the {kind.upper()} schema nor one of verl's keys")
        j += 1
    return problems


@pytest.mark.parametrize("page,body", shell_blocks(), ids=lambda v: v if v.endswith(".md") else "")
def test_every_shell_command_names_what_exists(page, body):
    text = (ROOT / page).read_text(encoding="utf-8")
    problems = [f"{' '.join(tokens)[:80]}: {p}" for tokens in commands(body) for p in check_command(tokens, text)]
    assert not problems, f"{page}:\n" + "\n".join(problems)


def test_the_checker_catches_what_the_issue_found():
    # A literal "..." (unpasteable), a key of neither schema, a missing config, a script flag that
    # does not exist, an unknown extra: each is caught.
    cases = {
        "python -m trainer.fsdp_sft_trainer data.train_files=... model.lora_rank=8": "literal '...'",
        "python -m trainer.rl_trainer trainer.no_such_key=1": "trainer.no_such_key",
        "python -m trainer.rl_trainer generation.temperature=0.5": "generation.temperature",
        "python -m trainer.fsdp_sft_trainer --config-name nope": "no config/nope.yaml",
        "python scripts/real_model_demo.py --no-such-flag": "no option --no-such-flag",
        "python -m trainer.export a b --fast": "no option --fast",
        "pip install -e '.[trackers,nope]'": "'nope'",
        "python -m trainer.nope": "no such module",
    }
    for line, expected in cases.items():
        problems = [p for tokens in commands(line) for p in check_command(tokens, "")]
        assert any(expected in p for p in problems), (line, problems)
    good = "torchrun --nproc_per_node=2 -m trainer.fsdp_sft_trainer [key=value ...] data.prompt_dict_keys=[question]"
    assert [p for tokens in commands(good) for p in check_command(tokens, "")] == []


# ----------------------------------------------------------------------------- YAML blocks, README
def test_yaml_config_blocks_use_only_schema_keys():
    checked = 0
    for page, body in blocks(lambda lang: lang == "yaml"):
        cfg = OmegaConf.to_container(OmegaConf.create(body))
        if not isinstance(cfg, dict) or "defaults" not in cfg:
            continue
        bases = [d if isinstance(d, str) else "" for d in cfg.pop("defaults")]
        kind = "rl" if any(b.startswith(("grpo", "gspo", "ppo", "rl_")) for b in bases) else "sft"

        def flat(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict) and not key_exists(f"{prefix}{k}", kind):
                    yield from flat(v, f"{prefix}{k}.")
                else:
                    yield f"{prefix}{k}"

        for key in flat(cfg):
            assert key_exists(key, kind), f"{page.name}: {key} is not a key of the {kind.upper()} schema"
        checked += 1
    assert checked >= 2


def test_readme_is_short_and_links_only_to_pages_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(((?:docs/|LICENSE)[^)#]*)", text):
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


DEVELOPMENT_NOTES = ("checked twice here", "previous stop's host", "against the goals", "this host", "once LoRA lands",
                     "every other argument as above", "global_step_500 my_model")


def test_user_pages_carry_no_development_notes():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        found = [n for n in DEVELOPMENT_NOTES if n in text]
        assert not found, f"{page.relative_to(ROOT)}: {found}"


# ----------------------------------------------------------------------------- the verl page's "after" lines
@pytest.fixture(scope="module")
def gsm8k_files(tmp_path_factory):
    from helpers import gsm8k_rows, write_parquet

    root = tmp_path_factory.mktemp("gsm8k")
    return {"train": str(write_parquet(gsm8k_rows(16, seed=5), root / "train.parquet")),
            "test": str(write_parquet(gsm8k_rows(4, seed=6), root / "test.parquet"))}


def test_the_verl_pages_command_lines_here_resolve_without_a_refusal(tiny_model, rl_data, gsm8k_files):
    """Coming from verl: the SFT and GRPO command lines it gives for this project compose and pass
    every check, with the model and data swapped for test assets (as a user's own would be)."""
    from hydra import compose, initialize_config_module

    from config.loading import resolve
    from config.rl_schema import RLConfig, lift_flat_sample_logging
    from config.schema import SFTConfig

    swaps = {"$HOME/data/gsm8k/train.parquet": None, "$HOME/data/gsm8k/test.parquet": None,
             "google/gemma-2b-it": str(tiny_model), "Qwen/Qwen2-7B-Instruct": str(tiny_model)}
    ran = set()
    for _, body in [(p, b) for p, b in blocks(lambda lang: lang in SHELLS) if p.name == "coming-from-verl.md"]:
        tokens = next(commands(body))
        if "-m" not in tokens:  # a block of other commands (scripts/verl_grpo_examples.py)
            continue
        module = tokens[tokens.index("-m") + 1]
        if module not in TRAINERS:
            continue
        kind = TRAINERS[module]
        files = gsm8k_files if kind == "sft" else {"train": str(rl_data["train"]), "test": str(rl_data["val"])}
        swaps["$HOME/data/gsm8k/train.parquet"], swaps["$HOME/data/gsm8k/test.parquet"] = files["train"], files["test"]
        text = body
        for old, new in swaps.items():
            text = text.replace(old, new)
        tokens = next(commands(text.replace("$HOME", "/tmp")))
        world = int(next(t.split("=")[1] for t in tokens if t.startswith("--nproc_per_node=")))
        rest = tokens[tokens.index("-m") + 2:]
        name = rest[rest.index("--config-name") + 1] if "--config-name" in rest else "sft_trainer"
        overrides = [t for t in rest if "=" in t and not t.startswith("-")]
        with initialize_config_module(config_module="config", version_base="1.3"):
            cfg = compose(name, overrides=overrides)
        schema, pre = (SFTConfig, None) if kind == "sft" else (RLConfig, lift_flat_sample_logging)
        c = resolve(cfg, schema, overrides, {}, world, preprocess=pre).config
        if kind == "rl":
            assert (c.algorithm.adv_estimator, c.rollout.responses_per_prompt, c.data.prompts_per_step) == ("grpo", 5, 1024)
        else:
            assert c.data.micro_batch_size_per_gpu == 4 and c.trainer.total_epochs == 2
        ran.add(kind)
    assert ran == {"sft", "rl"}


def test_python_examples_call_the_api_with_keys_that_exist():
    import inspect

    from config import trl
    from trainer.api import create_rl_trainer, create_sft_trainer

    apis = {  # function: (its own parameters, the TRL names it accepts, its config keys' kind)
        "create_rl_trainer": (set(inspect.signature(create_rl_trainer).parameters) - {"config_keys"}, trl.GRPO, "rl"),
        "create_sft_trainer": (set(inspect.signature(create_sft_trainer).parameters) - {"kwargs"}, trl.SFT, "sft"),
    }
    checked = {name: 0 for name in apis}
    for page, body in blocks(lambda lang: lang == "python"):
        for node in ast.walk(ast.parse(body)):
            name = getattr(getattr(node, "func", None), "id", None)
            if not isinstance(node, ast.Call) or name not in apis:
                continue
            params, trl_names, kind = apis[name]
            for kw in node.keywords:
                if kw.arg is None:  # **{"dotted.key": value}
                    keys = [k.value for k in kw.value.keys]
                elif kw.arg in params or kw.arg in trl_names:
                    continue
                else:
                    keys = [kw.arg.replace("__", ".")]
                for key in keys:
                    assert key_exists(key, kind), f"{page.name}: {name}(... {key} ...) is not an {kind.upper()} key"
            checked[name] += 1
    assert checked["create_rl_trainer"] >= 2 and checked["create_sft_trainer"] >= 1, checked


def test_the_trl_name_map_points_at_keys_that_exist():
    text = (ROOT / "docs" / "coming-from-trl.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `[^|]*\| ([^|]*) \|", text, re.M)
    keys = [k.split("=")[0] for cell in rows for k in re.findall(r"`([a-z_]+\.[a-z_.]+(?:=[^`]*)?)`", cell)]
    assert len(keys) > 30
    missing = [k for k in keys if not (key_exists(k, "rl") or key_exists(k, "sft"))]
    assert not missing, f"docs/coming-from-trl.md names keys that do not exist: {missing}"
