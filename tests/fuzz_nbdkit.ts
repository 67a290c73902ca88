/**
 * The fuzzer of `fuzz_test.ts`, pointed at nbdkit (C) for comparison; not
 * part of the suite, since nbdkit failing is not ours. Runs the same cases,
 * one at a time, against `nbdkit memory 4M` until it dies (or `--cases` have
 * run), several times from different seeds, then the same seeds against
 * nbdkit-ts, and prints what happened.
 *
 * ```sh
 * tests/fuzz_nbdkit.sh [--runs=5] [--cases=3000]
 * ```
 *
 * @module
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { alive, generate, runCase, type Target, Violation } from "./_fuzz_helpers.ts";
import { CLIENT_ENV, startTestServer } from "./helpers.ts";

const SIZE = 4 * 1024 * 1024;
const target: Target = { size: SIZE, readonly: false };

function option(name: string, fallback: number): number {
  const arg = process.argv.find((a) => a.startsWith(`--${name}=`));
  return arg ? Number(arg.slice(name.length + 3)) : fallback;
}
const RUNS = option("runs", 5);
const CASES = option("cases", 3000);

interface RunResult {
  /** Cases run before the server died (or all of them). */
  cases: number;
  /** The seed of the case during which it died. */
  seed: number | null;
  /** How it ended: exit status or signal, and the last line it printed. */
  end: string;
  /** Cases the server answered wrongly (unmutated cases only). */
  violations: number;
}

/** Run seeds one at a time against `socket` until `pid` dies. */
async function fuzz(socket: string, pid: number, firstSeed: number): Promise<RunResult> {
  let violations = 0;
  for (let i = 0; i < CASES; i++) {
    const seed = firstSeed + i;
    try {
      await runCase(socket, generate(seed, target), target);
    } catch (err) {
      if (err instanceof Violation) violations++;
    }
    // A dying process takes a moment: look twice before the next case.
    if (!alive(pid) || (await new Promise((r) => setTimeout(r, 0)), !alive(pid))) {
      return { cases: i + 1, seed, end: "", violations };
    }
  }
  return { cases: CASES, seed: null, end: "still running", violations };
}

async function runNbdkit(firstSeed: number): Promise<RunResult> {
  const dir = mkdtempSync(join(tmpdir(), "fuzz-nbdkit-"));
  const socket = join(dir, "sock");
  const child = spawn("nbdkit", ["-f", "-U", socket, "memory", `${SIZE}`], {
    env: CLIENT_ENV,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (d: string) => stderr += d);
  const exited = new Promise<string>((resolve) =>
    child.on("close", (code, signal) => resolve(signal ? `signal ${signal}` : `exit ${code}`))
  );
  for (let i = 0; i < 200 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 50));
  const result = await fuzz(socket, child.pid!, firstSeed);
  if (result.seed === null) child.kill("SIGTERM");
  const status = await exited;
  const last = stderr.trim().split("\n").filter((l) => !/invalid request|client sent/.test(l))
    .pop() ?? "";
  result.end = `${result.seed === null ? "still running, then stopped" : status}: ${last}`;
  rmSync(dir, { recursive: true, force: true });
  return result;
}

async function runOurs(firstSeed: number): Promise<RunResult> {
  const server = await startTestServer(["memory", `size=${SIZE}`]);
  const result = await fuzz(server.socket, server.pid, firstSeed);
  const status = result.seed === null ? await server.stop() : -1;
  result.end = result.seed === null
    ? `stopped, exit ${status}`
    : `died: ${server.stderr().slice(-500)}`;
  return result;
}

/** Run, print, exit: only when started as a program (a test runner may import every file). */
async function main(): Promise<void> {
  const rows: string[] = [];
  const died: number[] = [];
  for (let run = 0; run < RUNS; run++) {
    const firstSeed = 1 + run * 100_000;
    const theirs = await runNbdkit(firstSeed);
    const ours = await runOurs(firstSeed);
    if (theirs.seed !== null) died.push(theirs.cases);
    rows.push(
      `seeds ${firstSeed}…: nbdkit ${
        theirs.seed === null
          ? `survived ${theirs.cases} cases`
          : `died in case ${theirs.cases} (seed ${theirs.seed})`
      } [${theirs.end}]; nbdkit-ts ${
        ours.seed === null
          ? `served all ${ours.cases} cases`
          : `DIED in case ${ours.cases} (seed ${ours.seed})`
      }, ${ours.violations} wrong answers [${ours.end}]`,
    );
    console.log(rows[rows.length - 1]);
  }
  died.sort((a, b) => a - b);
  console.log(
    `\nnbdkit died in ${died.length} of ${RUNS} runs` +
      (died.length ? `, after ${died.join(", ")} cases (median ${died[died.length >> 1]})` : ""),
  );
  process.exit(0);
}

const self = fileURLToPath(import.meta.url);
const isMain = (import.meta as { main?: boolean }).main ??
  (process.argv[1] !== undefined && resolve(process.argv[1]) === self);
if (isMain) await main();
