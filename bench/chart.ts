/**
 * An SVG bar chart of benchmark ratios (ours ÷ the peer), one group per job.
 *
 * @module
 */
import type { Row } from "./run.ts";

const COLORS: Record<string, string> = {
  "ours/deno": "#2a7ab0",
  "ours/bun": "#d98c1f",
  "ours/node": "#3c9a4a",
};

function escape(text: string): string {
  return text.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;");
}

/**
 * Render the chart.
 *
 * @param rows Benchmark rows with a value per contender, nbdkit among them.
 * @param names The contenders, nbdkit first.
 * @returns SVG text.
 */
export function renderChart(rows: Row[], names: string[]): string {
  const ours = names.filter((n) => n !== "nbdkit");
  const rowsWithPeer = rows.filter((r) => r.values["nbdkit"]);
  const barH = 14;
  const groupH = ours.length * barH + 18;
  const left = 420;
  const width = 1000;
  const plotW = width - left - 60;
  const top = 50;
  const height = top + rowsWithPeer.length * groupH + 50;
  const maxRatio = Math.max(
    2,
    ...rowsWithPeer.flatMap((r) => ours.map((n) => (r.values[n] ?? 0) / r.values["nbdkit"])),
  );
  const x = (ratio: number) => left + (ratio / maxRatio) * plotW;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="${
      width / 2
    }" y="22" text-anchor="middle" font-size="16" font-weight="bold">nbdkit-ts ÷ its peer in the same run (nbdkit 1.32; nbdcopy for streaming); 1.0× = parity</text>`,
  ];
  rowsWithPeer.forEach((row, i) => {
    const y0 = top + i * groupH;
    const better = row.higherIsBetter ? "higher is better" : "lower is better";
    out.push(
      `<text x="${left - 8}" y="${y0 + groupH / 2}" text-anchor="end">${escape(row.label)}</text>`,
      `<text x="${left - 8}" y="${
        y0 + groupH / 2 + 13
      }" text-anchor="end" fill="#777" font-size="10">${better}</text>`,
    );
    ours.forEach((name, j) => {
      if (row.values[name] === undefined) return; // not measured on that runtime
      const ratio = row.values[name] / row.values["nbdkit"];
      const y = y0 + j * barH;
      out.push(
        `<rect x="${left}" y="${y}" width="${Math.max(1, x(ratio) - left)}" height="${
          barH - 3
        }" fill="${COLORS[name] ?? "#888"}"/>`,
        `<text x="${x(ratio) + 4}" y="${y + barH - 4}" font-size="10">${ratio.toFixed(2)}×</text>`,
      );
    });
  });
  const axisY = top + rowsWithPeer.length * groupH;
  out.push(
    `<line x1="${x(1)}" y1="${top - 6}" x2="${
      x(1)
    }" y2="${axisY}" stroke="black" stroke-dasharray="4 3"/>`,
    `<text x="${x(1)}" y="${axisY + 14}" text-anchor="middle">1.0×</text>`,
  );
  ours.forEach((name, j) => {
    const lx = left + j * 120;
    out.push(
      `<rect x="${lx}" y="${axisY + 26}" width="12" height="12" fill="${COLORS[name] ?? "#888"}"/>`,
      `<text x="${lx + 16}" y="${axisY + 36}">${escape(name)}</text>`,
    );
  });
  out.push("</svg>");
  return out.join("\n") + "\n";
}
