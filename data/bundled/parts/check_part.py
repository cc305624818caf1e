"""Check one part file of the bundled dataset: python check_part.py FILE.jsonl"""
import json, re, sys, unicodedata, itertools, collections

FLAWS = {"factual_error", "unsafe_advice", "gym_myth", "vague_generic", "overconfident", "ignores_context", "off_topic"}
path = sys.argv[1]
rows = [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]
problems = []
def toks(s):
    return set(re.findall(r"[a-z0-9]+", unicodedata.normalize("NFC", s).lower()))
for i, r in enumerate(rows, 1):
    if set(r) != {"question", "chosen", "rejected", "topic", "flaw", "safety"}:
        problems.append(f"row {i}: keys {sorted(r)}")
        continue
    n = len(r["chosen"].split())
    if not 40 <= n <= 150:
        problems.append(f"row {i}: chosen has {n} words (need 40-150)")
    m = len(r["rejected"].split())
    if not 15 <= m <= 150:
        problems.append(f"row {i}: rejected has {m} words (need 15-150)")
    if r["flaw"] not in FLAWS:
        problems.append(f"row {i}: flaw {r['flaw']!r}")
    if not isinstance(r["safety"], bool):
        problems.append(f"row {i}: safety must be true/false")
    if r["chosen"].strip() == r["rejected"].strip():
        problems.append(f"row {i}: chosen == rejected")
qs = [toks(r["question"]) for r in rows]
for (i, a), (j, b) in itertools.combinations(enumerate(qs, 1), 2):
    if a and b and len(a & b) / len(a | b) > 0.8:
        problems.append(f"rows {i} and {j}: questions near-duplicate")
print("\n".join(problems) or "OK")
print(len(rows), "rows;", dict(collections.Counter(r.get("topic") for r in rows)), dict(collections.Counter(r.get("flaw") for r in rows)), "safety:", sum(bool(r.get("safety")) for r in rows))
