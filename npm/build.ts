/**
 * Build the npm package `nbdkit-ts` into `npm/dist/` from the same source
 * that Deno and Bun run: ESM JavaScript with `.d.ts` types and source maps
 * (TypeScript's own compiler, `npm/tsconfig.json`), a `package.json` made
 * from deno.json and version.ts, the README and the LICENSE.
 *
 * ```sh
 * deno task build:npm            # npm/dist/, ready for `npm pack` / `npm publish`
 * deno task build:npm --tests    # and tests/ compiled into npm/.test-build/ for `node --test`
 * ```
 *
 * It fails when deno.json and the package disagree: the version, or an
 * export that has no built file. Only `node:` modules are used, so
 * `bun npm/build.ts` works too.
 *
 * @module
 */
import { spawnSync } from "node:child_process";
import { chmodSync, copyFileSync, existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { VERSION } from "../version.ts";

const NPM = dirname(fileURLToPath(import.meta.url));
const ROOT = join(NPM, "..");
const DIST = join(NPM, "dist");
/** Where tsc puts the JavaScript inside the package. */
const CODE = "esm";
const TEST_BUILD = join(NPM, ".test-build");

interface DenoJson {
  name: string;
  version: string;
  license: string;
  exports: Record<string, string>;
  publish?: { include?: string[] };
}

interface PackageExport {
  types: string;
  default: string;
}

function readJson<T>(path: string): T {
  return JSON.parse(readFileSync(path, "utf8")) as T;
}

function fail(message: string): never {
  process.stderr.write(`npm/build.ts: ${message}\n`);
  process.exit(1);
}

function tsc(project: string): void {
  const bin = join(ROOT, "node_modules", "typescript", "bin", "tsc");
  if (!existsSync(bin)) fail("TypeScript is not installed: run `npm install` first");
  const r = spawnSync("node", [bin, "-p", project], { stdio: "inherit" });
  if (r.error) fail(`cannot run tsc with node: ${r.error.message}`);
  if (r.status !== 0) fail(`tsc -p ${project} failed`);
}

/** `./mod.ts` → `./esm/mod.js`, as tsc (rootDir = the repository) lays it out. */
function built(path: string, ext: string): string {
  return `./${CODE}/${path.replace(/^\.\//, "").replace(/\.ts$/, ext)}`;
}

/**
 * The package's exports, one per deno.json export; every file must exist
 * and be on JSR's publish list.
 */
function packageExports(deno: DenoJson): Record<string, PackageExport> {
  const exports: Record<string, PackageExport> = {};
  const include = deno.publish?.include ?? [];
  for (const [key, source] of Object.entries(deno.exports)) {
    const file = source.replace(/^\.\//, "");
    if (!include.some((entry) => file === entry || file.startsWith(entry))) {
      fail(`deno.json: export '${key}' (${source}) is not in publish.include`);
    }
    exports[key] = { types: built(source, ".d.ts"), default: built(source, ".js") };
    for (const target of Object.values(exports[key])) {
      if (!existsSync(join(DIST, target))) {
        fail(`export '${key}': ${target} was not built (is ${source} in npm/tsconfig.json?)`);
      }
    }
  }
  return exports;
}

/** The package's exports must mirror deno.json's, key for key and file for file. */
function checkExports(deno: DenoJson, pkg: { exports: Record<string, PackageExport> }): void {
  const denoKeys = Object.keys(deno.exports).sort();
  const npmKeys = Object.keys(pkg.exports).sort();
  if (denoKeys.join() !== npmKeys.join()) {
    fail(
      `exports differ: deno.json has ${denoKeys.join(", ")}; package.json ${npmKeys.join(", ")}`,
    );
  }
  for (const key of denoKeys) {
    if (pkg.exports[key].default !== built(deno.exports[key], ".js")) {
      fail(
        `export '${key}': deno.json ${deno.exports[key]}, package.json ${pkg.exports[key].default}`,
      );
    }
  }
}

function buildPackage(): void {
  const deno = readJson<DenoJson>(join(ROOT, "deno.json"));
  const dev = readJson<{ optionalDependencies?: Record<string, string> }>(
    join(ROOT, "package.json"),
  );
  if (deno.version !== VERSION) {
    fail(`deno.json's version ${deno.version} is not version.ts's ${VERSION}`);
  }
  rmSync(DIST, { recursive: true, force: true });
  tsc(join(NPM, "tsconfig.json"));

  // The command runs on Node when installed from npm: swap cli.ts's Deno shebang
  // (one line for one line, so the source map still fits).
  const cli = join(DIST, CODE, "cli.js");
  const text = readFileSync(cli, "utf8");
  if (!text.startsWith("#!")) fail("cli.ts must start with a shebang line");
  writeFileSync(cli, text.replace(/^#![^\n]*/, "#!/usr/bin/env node"));
  chmodSync(cli, 0o755);
  // Loaded by URL, not imported: tsc builds them because tsconfig names them.
  for (const file of ["runtime/node_ts_hooks.js"]) {
    if (!existsSync(join(DIST, CODE, file))) fail(`${file} was not built`);
  }

  const koffi = dev.optionalDependencies?.koffi;
  if (!koffi) fail("package.json: koffi is missing from optionalDependencies");
  const pkg = {
    name: "nbdkit-ts",
    version: VERSION,
    description: "NBD (Network Block Device) server toolkit in TypeScript, modelled on nbdkit: " +
      "libvirt, streaming, memory, null and file plugins, and your own, on Node, Deno and Bun",
    keywords: ["nbd", "nbdkit", "network block device", "libvirt", "qemu", "disk", "server"],
    license: deno.license,
    type: "module",
    bin: { "nbdkit-ts": built("./cli.ts", ".js") },
    main: built("./mod.ts", ".js"),
    types: built("./mod.ts", ".d.ts"),
    exports: packageExports(deno),
    files: [`${CODE}/`],
    engines: { node: ">=20" },
    // FFI for the libvirt plugin on Node only; everything else needs nothing.
    optionalDependencies: { koffi },
  };
  checkExports(deno, pkg);
  writeFileSync(join(DIST, "package.json"), JSON.stringify(pkg, null, 2) + "\n");
  copyFileSync(join(ROOT, "README.md"), join(DIST, "README.md"));
  copyFileSync(join(ROOT, "LICENSE"), join(DIST, "LICENSE"));
  console.log(`npm/dist: nbdkit-ts ${VERSION}`);
}

function buildTests(): void {
  rmSync(TEST_BUILD, { recursive: true, force: true });
  tsc(join(NPM, "tsconfig.test.json"));
  console.log("npm/.test-build: the tests, compiled for node --test");
}

const args = process.argv.slice(2);
for (const arg of args) {
  if (arg !== "--tests") fail(`unknown argument '${arg}' (usage: build.ts [--tests])`);
}
buildPackage();
if (args.includes("--tests")) buildTests();
