"""Build the offline HTML template for `dvc plots show` / `dvc plots diff`: vega, vega-lite and vega-embed inlined.

    python scripts/build_plots_template.py [--out .dvc/plots/offline.html]

dvc-render 1.0.2's default page loads vega@5.20.2, vega-lite@5.2.0 and vega-embed@6.18.2 from
cdn.jsdelivr.net, so offline the page is blank. This script fetches the same major versions (their latest
patch releases, which fix vega's XSS advisories) from the npm registry with `npm pack` (npm checks each
tarball against the registry's sha512, and so does this script), and writes a page with the three minified
UMD builds inside <script> tags. The page has no `{scripts}` placeholder, so DVC never adds its CDN tags;
`{plot_divs}` and `{refresh_tag}` are the placeholders dvc-render fills.

`.dvc/config` points DVC at the result (`dvc config plots.html_template plots/offline.html`, a path relative
to `.dvc/`). Needs node/npm and the npm registry; the built file (~0.8 MB) is committed, so using it needs
neither.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

# name -> (version, the file inside the package, the registry's sha512 of the tarball).
# Same majors as dvc-render's CDN tags; vega-embed 6.29 needs vega ^5.21, vega-lite 5.23 needs vega ^5.24.
PACKAGES = {
    "vega": (
        "5.33.1",
        "build/vega.min.js",
        "sha512-1fArfVDUqVbb5z8n+/nVQb+VNBzx8svY6CrsyTK4Ujm4yrd9I1auoKxBAPXLCavY1LcrbHUskQbGUP8gXOzyQw==",
    ),
    "vega-lite": (
        "5.23.0",
        "build/vega-lite.min.js",
        "sha512-l4J6+AWE3DIjvovEoHl2LdtCUkfm4zs8Xxx7INwZEAv+XVb6kR6vIN1gt3t2gN2gs/y4DYTs/RPoTeYAuEg6mA==",
    ),
    "vega-embed": (
        "6.29.0",
        "build/vega-embed.min.js",
        "sha512-PmlshTLtLFLgWtF/b23T1OwX53AugJ9RZ3qPE2c01VFAbgt3/GSNI/etzA/GzdrkceXFma+FDHNXUppKuM0U6Q==",
    ),
}
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>qatune plots</title>
    <!-- Offline DVC plots page, written by scripts/build_plots_template.py: {versions} inlined from npm.
{licenses}
    -->
{scripts}
    <script>
        // SVG instead of vega-embed's default canvas: crisp when zoomed, and each mark is an element a test can find.
        window.vegaEmbed = (function (embed) {{
            function svgEmbed(el, spec, opts) {{ return embed(el, spec, Object.assign({{renderer: "svg"}}, opts)); }}
            return Object.assign(svgEmbed, embed);
        }})(window.vegaEmbed);
    </script>
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def npm_pack(name: str, version: str, integrity: str, workdir: Path) -> Path:
    """Download one package tarball from the npm registry and check it against the pinned sha512."""
    out = subprocess.run(
        ["npm", "pack", f"{name}@{version}", "--json", "--pack-destination", str(workdir)],
        cwd=workdir,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    tarball = workdir / json.loads(out)[0]["filename"]
    digest = "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode()
    if digest != integrity:
        raise SystemExit(f"error: {tarball.name}: sha512 {digest} does not match the pinned {integrity}")
    return tarball


def read_member(tarball: Path, member: str) -> str:
    with tarfile.open(tarball) as tar:
        data = tar.extractfile(f"package/{member}")
        if data is None:
            raise SystemExit(f"error: {tarball.name} has no {member}")
        return data.read().decode("utf-8")


def license_text(tarball: Path, name: str, version: str) -> str:
    """BSD-3-Clause asks that copies keep the notice: the package's LICENSE, or its package.json field."""
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    if "package/LICENSE" in names:
        text = read_member(tarball, "LICENSE").strip()
    else:  # vega's tarball ships no LICENSE file, only the field
        text = json.loads(read_member(tarball, "package.json"))["license"]
    return f"{name}@{version}:\n{text.replace('--', '- -')}"  # "--" may not appear inside an HTML comment


def inline_script(name: str, version: str, code: str) -> str:
    # The page must never ask for anything: drop the source-map comment (devtools would fetch it).
    lines = [line for line in code.splitlines() if not line.startswith("//# sourceMappingURL=")]
    code = "\n".join(lines)
    # `</script` would end the tag early; a dvc-render placeholder would be replaced inside the code.
    for bad in ("</script", *PLACEHOLDERS):
        if bad in code.lower():
            raise SystemExit(f"error: {name}@{version} contains {bad!r}; it cannot be inlined as is")
    return f'    <script data-package="{name}@{version}">\n{code}\n    </script>'


def build(out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        scripts, licenses = [], []
        for name, (version, member, integrity) in PACKAGES.items():
            tarball = npm_pack(name, version, integrity, Path(tmp))
            scripts.append(inline_script(name, version, read_member(tarball, member)))
            licenses.append(license_text(tarball, name, version))
    versions = ", ".join(f"{name}@{version}" for name, (version, _, _) in PACKAGES.items())
    out.parent.mkdir(parents=True, exist_ok=True)
    page = PAGE.format(versions=versions, licenses="\n\n".join(licenses), scripts="\n".join(scripts))
    out.write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(".dvc/plots/offline.html"),
        help="where to write the template (default: .dvc/plots/offline.html, what .dvc/config names)",
    )
    args = parser.parse_args(argv)
    path = build(args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
