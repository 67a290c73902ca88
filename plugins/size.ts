/**
 * Sizes as nbdkit writes them: a decimal number with an optional suffix.
 *
 * @module
 */

const SUFFIX_SHIFT: Record<string, bigint> = {
  b: 0n,
  s: 9n,
  k: 10n,
  K: 10n,
  m: 20n,
  M: 20n,
  g: 30n,
  G: 30n,
  t: 40n,
  T: 40n,
  p: 50n,
  P: 50n,
  e: 60n,
  E: 60n,
};

/**
 * The largest size: nbdkit's, INT64_MAX.
 *
 * @example
 * ```ts
 * import { MAX_SIZE, parseSize } from "./size.ts";
 * console.assert(parseSize("9223372036854775807") === MAX_SIZE);
 * ```
 */
export const MAX_SIZE: bigint = (1n << 63n) - 1n;

/**
 * Parse a size the way nbdkit does: digits, then an optional suffix
 * `b` (bytes), `s` (512-byte sectors), `k`/`K`, `m`/`M`, `g`/`G`, `t`/`T`,
 * `p`/`P`, `e`/`E` (powers of 1024). At most 2^63 − 1.
 *
 * @param text The size as typed.
 * @returns The size in bytes.
 * @throws {Error} When the text is not a size, with nbdkit's wording.
 *
 * @example
 * ```ts
 * import { parseSize } from "./size.ts";
 * // In a plugin's config: size = parseSize(value)
 * console.assert(parseSize("1G") === 1073741824n);
 * console.assert(parseSize("4k") === 4096n);
 * console.assert(parseSize("2s") === 1024n);
 * ```
 */
export function parseSize(text: string): bigint {
  const match = /^\s*([+-]?)(\d+)(.*)$/s.exec(text);
  if (!match) throw new Error(`could not parse size: '${text}' is not a number`);
  const [, sign, digits, suffix] = match;
  if (sign === "-" && /[1-9]/.test(digits)) throw new Error(`size cannot be negative (${text})`);
  let shift = 0n;
  if (suffix !== "") {
    if (!(suffix in SUFFIX_SHIFT)) {
      throw new Error(`could not parse size: unknown suffix '${suffix}'`);
    }
    shift = SUFFIX_SHIFT[suffix];
  }
  const size = BigInt(digits) << shift;
  if (size > MAX_SIZE) throw new Error(`overflow computing size (${text})`);
  return size;
}

/**
 * Format a byte count for people: `1 GiB`, `512 KiB`, `1.5 MiB`.
 *
 * @param bytes A byte count.
 * @returns A short human readable text.
 *
 * @example
 * ```ts
 * import { formatSize } from "./size.ts";
 * console.assert(formatSize(1073741824) === "1 GiB");
 * console.assert(formatSize(1536n * 1024n) === "1.5 MiB");
 * console.assert(formatSize(512) === "512 B");
 * ```
 */
export function formatSize(bytes: number | bigint): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
  let value = Number(bytes);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const text = Number.isInteger(value) ? String(value) : value.toFixed(1);
  return `${text} ${units[unit]}`;
}
