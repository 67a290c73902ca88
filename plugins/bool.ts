/**
 * Boolean parameters as nbdkit reads them (`nbdkit_parse_bool`), so that
 * `readonly=on`, `cache=no` and `verbose=1` mean what they mean to nbdkit.
 *
 * @module
 */

const TRUE = new Set(["1", "true", "t", "yes", "y", "on"]);
const FALSE = new Set(["0", "false", "f", "no", "n", "off"]);

/**
 * Read a boolean parameter: `1`, `true`, `t`, `yes`, `y` or `on` is true;
 * `0`, `false`, `f`, `no`, `n` or `off` is false, in any case.
 *
 * @param value The parameter's value.
 * @returns The boolean.
 * @throws {Error} `could not decipher boolean (VALUE)`, nbdkit's message,
 *   for anything else (thrown from `config`, it stops the server with it).
 *
 * @example In a plugin's config step
 * ```ts
 * import { parseBool } from "./bool.ts";
 * const settings = { sparse: true };
 * function config(key: string, value: string): void {
 *   if (key === "sparse") settings.sparse = parseBool(value);
 * }
 * config("sparse", "Off");
 * console.assert(!settings.sparse && parseBool("yes") && !parseBool("0"));
 * ```
 */
export function parseBool(value: string): boolean {
  const v = value.toLowerCase();
  if (TRUE.has(v)) return true;
  if (FALSE.has(v)) return false;
  throw new Error(`could not decipher boolean (${value})`);
}
