/**
 * The runtime in use, chosen once, by feature detection, in this one file.
 *
 * @module
 */
import type { Runtime } from "./types.ts";

export type * from "./types.ts";

async function detect(): Promise<Runtime> {
  const g = globalThis as { Deno?: { version?: { deno?: string } }; Bun?: unknown };
  if (g.Deno?.version?.deno) return (await import("./deno.ts")).denoRuntime;
  if (g.Bun) return (await import("./bun.ts")).bunRuntime;
  return (await import("./node.ts")).nodeRuntime;
}

/** The adapter for the runtime this program runs on. */
export const runtime: Runtime = await detect();
