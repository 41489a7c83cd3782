"""What a policy file declares the database may hold, and what changes when another file replaces it.

`declared(policy)` is the form kept in the database (`policy_applied.declared`, migration 0012):
{category: [field path, ...]}, the paths as `policy.leaves` names them (`stack.frames[]`), of every
field whose value is stored in any form: not-stored fields are left out (nothing of them is held),
and the fields stored without being read from the body (the sender's address) are in. A file that
takes a field out, or stores it `not-stored` from now on, removes it; one that adds a field or a
category only adds.
"""

from __future__ import annotations

from dataclasses import dataclass

from policy.model import Category, Policy, leaves


def stored_paths(category: Category) -> list[str]:
    """The paths of the category's fields the database may hold a value of, in the file's order."""
    out = []
    for top in category.fields:
        out += [path for path, f in leaves(top, top.name) if category.sealed or f.storage != "not-stored"]
    out += [name for name, stored, _ in category.extra if stored != "not-stored"]
    return out


CLEAR = ("key", "plaintext", "anonymised", "keyed-hash")


def clear_leaves(category: Category) -> list[tuple[str, str]]:
    """(path, storage) of every field a record keeps in the clear (records.fields): plaintext, anonymised,
    keyed-hash and the lookup keys; of a sealed category only its keys."""
    out = []
    for top in category.fields:
        out += [(path, f.storage) for path, f in leaves(top, top.name)
                if f.storage == "key" or (not category.sealed and f.storage in CLEAR)]
    out += [(name, stored) for name, stored, _ in category.extra if stored in CLEAR]
    return out


def declared(policy: Policy) -> dict[str, list[str]]:
    """{category: [field path, ...]} of every category of the policy (see the module docstring)."""
    return {c.name: stored_paths(c) for c in policy.categories}


def source_name(policy: Policy) -> str:
    """How a policy is named in policy_applied and in messages: its file, or "built-in"."""
    from policy import BUILTIN_PATH

    return "built-in" if not policy.source or str(policy.source) == str(BUILTIN_PATH) else str(policy.source)


@dataclass(frozen=True)
class Change:
    """From what the database holds (`held`, a `declared` map) to a policy file."""

    categories_removed: tuple[str, ...]  # held, no longer declared: every record of it goes
    fields_removed: tuple[tuple[str, str], ...]  # (category, path) of a category the file still declares
    categories_added: tuple[str, ...]
    fields_added: tuple[tuple[str, str], ...]

    @property
    def removes(self) -> bool:
        return bool(self.categories_removed or self.fields_removed)

    @property
    def changes(self) -> bool:
        return self.removes or bool(self.categories_added or self.fields_added)

    def removed_text(self) -> str:
        """What would go, as `policy check` names keys: category[download]; category[crash].field[os.name]."""
        parts = [f"category[{c}]" for c in self.categories_removed]
        parts += [f"category[{c}].field[{p}]" for c, p in self.fields_removed]
        return "; ".join(parts)


def compare(held: dict[str, list[str]], policy: Policy) -> Change:
    """What replacing the held declaration with the policy's removes and adds."""
    now = declared(policy)
    return Change(
        categories_removed=tuple(c for c in held if c not in now),
        fields_removed=tuple((c, p) for c, paths in held.items() if c in now for p in paths if p not in now[c]),
        categories_added=tuple(c for c in now if c not in held),
        fields_added=tuple((c, p) for c, paths in now.items() if c in held for p in paths if p not in held[c]),
    )
