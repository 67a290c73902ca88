#!/usr/bin/env -S deno run -A
/**
 * The `nbdkit-ts` command: nbdkit's command line, on Deno, Bun or Node.
 *
 * ```sh
 * deno run -A cli.ts -U - memory size=1G --run 'nbdinfo "$uri"'
 * bun cli.ts -U - memory size=1G --run 'nbdinfo "$uri"'
 * ```
 *
 * @module
 */
import { runtime } from "./runtime/mod.ts";
import { main } from "./server/main.ts";

runtime.exit(await main(runtime.args));
