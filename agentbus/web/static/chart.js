// Cost and time over steps, drawn as SVG by hand: the session's running total in dollars (line, left
// axis) and the seconds each step took (bars, right axis).

import { s } from "./dom.js";

const W = 560, H = 190, L = 52, R = 44, T = 14, B = 28;

function ticks(max, n) {
  if (max <= 0) return [0];
  const raw = max / n, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((x) => x >= raw);
  const out = [];
  for (let v = 0; v <= max + step / 2; v += step) out.push(v);
  return out;
}

export function chart(points) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": "cost and time per step" });
  if (!points.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis" }, "no model calls yet"));
    return svg;
  }
  // at most ~400 points drawn: every k-th, keeping the last
  const k = Math.ceil(points.length / 400);
  const pts = points.filter((_, i) => i % k === 0 || i === points.length - 1);
  const n = pts.length;
  const maxCost = Math.max(...pts.map((p) => p.total), 1e-9);
  const maxTook = Math.max(...pts.map((p) => p.took), 1e-9);
  const x = (i) => L + (n === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
  const yc = (v) => H - B - (v / maxCost) * (H - T - B);
  const yt = (v) => H - B - (v / maxTook) * (H - T - B);
  const bw = Math.max(Math.min((W - L - R) / n - 2, 18), 1);
  for (const v of ticks(maxCost, 4)) {
    svg.append(s("line", { x1: L, x2: W - R, y1: yc(v), y2: yc(v), class: "grid" }));
    svg.append(s("text", { x: L - 4, y: yc(v) + 4, "text-anchor": "end", class: "axis" }, "$" + v.toPrecision(2)));
  }
  for (const v of ticks(maxTook, 4)) {
    svg.append(s("text", { x: W - R + 4, y: yt(v) + 4, class: "axis took" }, v.toFixed(v < 10 ? 1 : 0) + "s"));
  }
  pts.forEach((p, i) => {
    svg.append(s("rect", { x: x(i) - bw / 2, y: yt(p.took), width: bw, height: H - B - yt(p.took), class: "stepbar" },
      s("title", {}, `step ${p.step}: ${p.took.toFixed(1)}s, $${p.cost.toFixed(4)}, ${p.tokens} tokens`)));
  });
  const d = pts.map((p, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${yc(p.total).toFixed(1)}`).join(" ");
  svg.append(s("path", { d, class: "line" }));
  pts.forEach((p, i) => svg.append(s("circle", { cx: x(i), cy: yc(p.total), r: 2.5, class: "dot" },
    s("title", {}, `step ${p.step}: total $${p.total.toFixed(4)}`))));
  svg.append(s("text", { x: L, y: H - 8, class: "axis" }, `step ${pts[0].step}`));
  svg.append(s("text", { x: W - R, y: H - 8, "text-anchor": "end", class: "axis" }, `step ${pts[n - 1].step}`));
  svg.append(s("text", { x: (W - R + L) / 2, y: H - 8, "text-anchor": "middle", class: "axis" }, "— total cost   ▮ seconds per step"));
  return svg;
}
