"""CLI options generated from config dataclasses: the field is the single source of name, type, default and help.

`@config_options(ExtractConfig)` gives a typer command one `--field-name` option per field of the config
(`--batch-size` sets `batch_size`; booleans are `--x/--no-x`), and passes the
command a validated `config=` built by `build_config`, so a command never restates a default.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, get_type_hints

import typer

from kmim.contract.config import DERIVED, build_config, help_of


def _option_names(name: str, typ: Any) -> list[str]:
    dashed = name.replace("_", "-")
    return [f"--{dashed}/--no-{dashed}"] if typ is bool else [f"--{dashed}"]


def config_options(cls: type, *, where: str, skip: tuple[str, ...] = ()) -> Callable:
    """Decorate `command(..., config)`: every field of `cls` becomes an option, `config` the built config."""

    hints = get_type_hints(cls)
    settable = [f for f in dataclasses.fields(cls) if f.name not in skip and not f.metadata.get(DERIVED)]

    def wrap(command: Callable) -> Callable:
        own = inspect.signature(command)
        own_hints = get_type_hints(command)
        params = [
            p.replace(annotation=own_hints.get(p.name, p.annotation))
            for p in own.parameters.values()
            if p.name != "config"
        ]
        taken = {p.name for p in params}
        for f in settable:
            if f.name in taken:
                raise TypeError(f"{command.__name__}: option {f.name} is both a config field and a parameter")
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            default = (
                ...
                if required
                else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            )
            option = typer.Option(
                default, *_option_names(f.name, hints[f.name]), help=help_of(f), show_default=not required
            )
            params.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[f.name]
                )
            )

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            values = {f.name: kwargs.pop(f.name) for f in settable}
            return command(config=build_config(cls, values, where), **kwargs)

        positional = [p for p in params if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in positional + keyword]
        )
        run.__annotations__ = {p.name: p.annotation for p in positional + keyword}
        del run.__wrapped__  # typer must see the generated signature, not the command's own
        return run

    return wrap
