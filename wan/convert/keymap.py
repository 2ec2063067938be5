"""A declarative key table: pairs of key patterns, `{}` standing for one key component
(a block index, or a parameter name such as `weight`).

    table = KeyTable([("blocks.{}.self_attn.q.weight", "blocks.{}.attn1.to_q.weight"), ...])
    theirs = table.to_target(ours)      # official names -> the other layout
    ours = table.to_source(theirs)      # and back

Every key must match exactly one row; unmatched keys raise an error that lists them, so a
layout change is caught at load time rather than silently dropping weights.
"""

import re


def _compile(pattern):
    parts = [re.escape(p) for p in pattern.split("{}")]
    return re.compile("^" + r"([^.]+)".join(parts) + "$")


class KeyTable:
    def __init__(self, pairs, name="key table"):
        """pairs: (official pattern, target pattern); the first row that matches a key wins."""
        self.name = name
        self.pairs = list(pairs)
        self._forward = [(_compile(src), dst) for src, dst in self.pairs]
        self._backward = [(_compile(dst), src) for src, dst in self.pairs]

    @staticmethod
    def _rename(key, rules):
        for regex, target in rules:
            match = regex.match(key)
            if match:
                return target.format(*match.groups())
        return None

    def _convert(self, state_dict, rules, direction):
        out, unmatched = {}, []
        for key, value in state_dict.items():
            new_key = self._rename(key, rules)
            if new_key is None:
                unmatched.append(key)
            else:
                out[new_key] = value
        if unmatched:
            preview = ", ".join(sorted(unmatched)[:8])
            raise KeyError(f"{self.name} ({direction}): {len(unmatched)} key(s) match no row: {preview}"
                           + (" ..." if len(unmatched) > 8 else ""))
        return out

    def to_target(self, state_dict):
        return self._convert(state_dict, self._forward, "official -> target")

    def to_source(self, state_dict):
        return self._convert(state_dict, self._backward, "target -> official")

    def matches_target(self, keys):
        """True when every key is in the target layout of this table."""
        return all(self._rename(k, self._backward) is not None for k in keys)
