"""Reading YAML written by people (sweep files, published measurement sets): the one YAML reader.

On top of formulas/documents.py's limits (a regular file only, UTF-8, MAX_DEPTH) and at most
MAX_YAML_BYTES, a YAML document is refused, with one DocumentError naming the file and the line, when:

- a key is given twice in one mapping (yaml would keep the last one without a word);
- it uses more than MAX_ALIASES aliases, or its aliases expand to more than MAX_NODES values
  (a few hundred bytes of nested aliases — "billion laughs" — expand to gigabytes in any code that
  walks the result);
- it nests deeper than MAX_DEPTH levels.

JSON documents are read by formulas.documents.load_json, re-exported here.
"""

from formulas.documents import (  # noqa: F401  (re-exported: the one reader of every document)
    MAX_BYTES,
    MAX_DEPTH,
    DocumentError,
    decode,
    load_json,
    parse_json,
    read_bytes,
)

MAX_YAML_BYTES = 2**20  # yaml's pure-Python parser reads about 100 KB a second on a busy core; the largest set is 120 KB
MAX_ALIASES = 100  # aliases (*name) in one document
MAX_NODES = 1_000_000  # scalars, sequences and mappings, each alias counted as often as it is used


def _loader():
    """yaml's SafeLoader, refusing a key given twice, too many aliases and too deep a nesting."""
    import yaml

    class Loader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    mark = self.peek_event().start_mark
                    raise yaml.composer.ComposerError(None, None, f"more than {MAX_ALIASES} aliases", mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            keys = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    seen = key in keys
                except TypeError:  # an unhashable key: yaml's own error says so
                    break
                if seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                keys.add(key)
            return super().construct_mapping(node, deep)

    return Loader


def _expanded_size(node, limit):
    """How many values the composed document becomes once every alias is expanded (stops past `limit`)."""
    import yaml

    sizes = {}  # id(node) → expanded size, for nodes met again through an alias
    order, stack = [], [node]
    while stack:  # post-order without recursion
        n = stack.pop()
        if id(n) in sizes:
            continue
        sizes[id(n)] = None
        order.append(n)
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            stack.extend(x for kv in n.value for x in kv)
    total = 0
    for n in reversed(order):
        if isinstance(n, yaml.SequenceNode):
            size = 1 + sum(sizes[id(c)] or 1 for c in n.value)
        elif isinstance(n, yaml.MappingNode):
            size = 1 + sum((sizes[id(k)] or 1) + (sizes[id(v)] or 1) for k, v in n.value)
        else:
            size = 1
        sizes[id(n)] = min(size, limit + 1)
        total = sizes[id(n)]
    return total


def parse_yaml(data, where):
    """The YAML document in `data` (bytes or str) within the limits above; DocumentError naming `where`."""
    import yaml

    from formulas.documents import depth

    text = decode(data, where)
    loader = _loader()(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, MAX_NODES) > MAX_NODES:
            raise DocumentError(f"{where}: its aliases expand to more than {MAX_NODES:,} values")
        doc = loader.construct_document(node)
    except RecursionError:
        raise DocumentError(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise DocumentError(f"{where}: invalid YAML{at}: {getattr(e, 'problem', None) or str(e).splitlines()[0]}") \
            from None
    finally:
        loader.dispose()
    if depth(doc, MAX_DEPTH) > MAX_DEPTH:
        raise DocumentError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    return doc


def load_yaml(path, max_bytes=MAX_YAML_BYTES, where=None):
    """parse_yaml of the regular file at `path`."""
    where = where or path
    return parse_yaml(read_bytes(path, max_bytes, where), where)
