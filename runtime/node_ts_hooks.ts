/**
 * Module hooks that let Node load plugins written in TypeScript, registered
 * by the Node adapter (`node.ts`) with `module.register` before it imports a
 * `.ts` plugin. Deno and Bun load TypeScript themselves and never use this.
 *
 * - load: a `.ts` module is handed to Node first (Node ≥ 22.18 strips types
 *   itself); when Node does not know the extension, its types are removed
 *   with `module.stripTypeScriptTypes` (Node ≥ 22.13) or, failing that, with
 *   the `typescript` package found beside the plugin, the working directory
 *   or nbdkit-ts.
 * - resolve: an import of `X.ts` that does not exist finds a compiled `X.js`
 *   beside it, so a plugin that imports nbdkit-ts's `mod.ts` by path runs
 *   against the npm build, where that file is `mod.js`.
 *
 * @module
 */
import * as nodeModule from "node:module";
import { readFile } from "node:fs/promises";
import { pathToFileURL } from "node:url";
// Not `import process from "node:process"`: Node builds that module by
// reading every property of `process`, stdout's getter among them, which
// makes a piped stdout nonblocking for every process that shares the pipe
// (`nbdcopy -- [ nbdkit-ts … ] - | sha256sum` failed with EAGAIN).
const process = globalThis.process;

interface ResolveResult {
  url: string;
  format?: string | null;
  shortCircuit?: boolean;
}

interface LoadResult {
  format: string;
  source?: string | ArrayBuffer | Uint8Array;
  shortCircuit?: boolean;
}

type NextResolve = (specifier: string, context?: unknown) => Promise<ResolveResult>;
type NextLoad = (url: string, context?: unknown) => Promise<LoadResult>;

const TS_EXTENSION = /\.(m?)ts$/;

function codeOf(err: unknown): unknown {
  return (err as { code?: unknown })?.code;
}

/** Resolve as Node does; a missing relative or absolute `X.ts` falls back to `X.js`. */
export async function resolve(
  specifier: string,
  context: unknown,
  nextResolve: NextResolve,
): Promise<ResolveResult> {
  try {
    return await nextResolve(specifier, context);
  } catch (err) {
    const isPath = /^(\.{1,2}\/|\/|file:)/.test(specifier);
    if (codeOf(err) !== "ERR_MODULE_NOT_FOUND" || !isPath || !TS_EXTENSION.test(specifier)) {
      throw err;
    }
    return await nextResolve(specifier.replace(TS_EXTENSION, ".$1js"), context);
  }
}

type Transpile = (source: string, url: string) => string;

let transpiler: Promise<Transpile> | undefined;

async function findTranspiler(url: string): Promise<Transpile> {
  const { stripTypeScriptTypes } = nodeModule as {
    stripTypeScriptTypes?: (code: string) => string;
  };
  if (stripTypeScriptTypes) return (source) => stripTypeScriptTypes(source);
  const bases = [url, pathToFileURL(`${process.cwd()}/`).href, import.meta.url];
  for (const base of bases) {
    let path: string;
    try {
      path = nodeModule.createRequire(base).resolve("typescript");
    } catch {
      continue;
    }
    const ts = (await import(pathToFileURL(path).href)).default as TypeScriptApi;
    return (source, fileName) =>
      ts.transpileModule(source, {
        fileName,
        compilerOptions: { module: ts.ModuleKind.ESNext, target: ts.ScriptTarget.ES2022 },
      }).outputText;
  }
  throw new Error(
    `Node ${process.version} cannot load TypeScript by itself: use Node 22.18 or later, ` +
      `install the npm package 'typescript' beside the plugin, or compile the plugin to JavaScript`,
  );
}

/** The little of the `typescript` package in use. */
interface TypeScriptApi {
  transpileModule(
    source: string,
    options: { fileName: string; compilerOptions: Record<string, unknown> },
  ): { outputText: string };
  ModuleKind: { ESNext: number };
  ScriptTarget: { ES2022: number };
}

/** Load as Node does; a `.ts` file Node cannot load is stripped of its types first. */
export async function load(url: string, context: unknown, nextLoad: NextLoad): Promise<LoadResult> {
  if (!url.startsWith("file:") || !TS_EXTENSION.test(new URL(url).pathname)) {
    return nextLoad(url, context);
  }
  try {
    return await nextLoad(url, context);
  } catch (err) {
    if (codeOf(err) !== "ERR_UNKNOWN_FILE_EXTENSION") throw err;
  }
  transpiler ??= findTranspiler(url);
  transpiler.catch(() => transpiler = undefined);
  const transpile = await transpiler;
  const source = await readFile(new URL(url), "utf8");
  return { format: "module", source: transpile(source, url), shortCircuit: true };
}
