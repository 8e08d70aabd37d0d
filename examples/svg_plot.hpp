// examples/svg_plot.hpp - a minimal line-chart SVG writer for the examples (two y axes, one x axis).
#pragma once

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "earn/core/error.hpp"

namespace earn::examples {

/// One plotted series: y values over the chart's x values, drawn against the left or right axis.
struct Series {
  std::string label;
  std::vector<double> y;
  std::string color;
  bool right_axis = false;
};

/// Writes an 800x480 line chart of `series` over `x` to `out`, an opened file named `path` (IoError when the
/// write fails).
inline void write_svg_chart(std::ofstream& out, const std::string& path, const std::string& title, const std::string& x_label,
                            const std::string& left_label, const std::string& right_label,
                            const std::vector<double>& x, const std::vector<Series>& series) {
  const double W = 800, H = 480, l = 80, r = 80, t = 50, b = 60;
  auto range = [&](bool right) {
    double hi = 0;
    for (const auto& s : series)
      if (s.right_axis == right)
        for (double v : s.y) hi = std::max(hi, v);
    return hi > 0 ? hi * 1.1 : 1.0;
  };
  const double x0 = x.empty() ? 0 : *std::min_element(x.begin(), x.end());
  const double x1 = x.empty() ? 1 : std::max(x0 + 1e-9, *std::max_element(x.begin(), x.end()));
  const double yl = range(false), yr = range(true);
  auto px = [&](double v) { return l + (v - x0) / (x1 - x0) * (W - l - r); };
  auto py = [&](double v, bool right) { return H - b - v / (right ? yr : yl) * (H - t - b); };
  std::ostringstream o;
  o << "<svg xmlns='http://www.w3.org/2000/svg' width='" << W << "' height='" << H << "' font-family='sans-serif' "
    << "font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n";
  o << "<text x='" << W / 2 << "' y='25' text-anchor='middle' font-size='15'>" << title << "</text>\n";
  o << "<line x1='" << l << "' y1='" << H - b << "' x2='" << W - r << "' y2='" << H - b << "' stroke='black'/>\n";
  o << "<line x1='" << l << "' y1='" << t << "' x2='" << l << "' y2='" << H - b << "' stroke='black'/>\n";
  o << "<line x1='" << W - r << "' y1='" << t << "' x2='" << W - r << "' y2='" << H - b << "' stroke='black'/>\n";
  for (int i = 0; i <= 4; ++i) {
    const double f = i / 4.0, y = H - b - f * (H - t - b);
    o << "<text x='" << l - 6 << "' y='" << y + 4 << "' text-anchor='end'>" << yl * f << "</text>\n";
    o << "<text x='" << W - r + 6 << "' y='" << y + 4 << "'>" << yr * f << "</text>\n";
  }
  for (double v : x) o << "<text x='" << px(v) << "' y='" << H - b + 18 << "' text-anchor='middle'>" << v << "</text>\n";
  o << "<text x='" << W / 2 << "' y='" << H - 15 << "' text-anchor='middle'>" << x_label << "</text>\n";
  o << "<text transform='translate(20," << H / 2 << ") rotate(-90)' text-anchor='middle'>" << left_label << "</text>\n";
  o << "<text transform='translate(" << W - 15 << "," << H / 2 << ") rotate(90)' text-anchor='middle'>" << right_label
    << "</text>\n";
  int legend = 0;
  for (const auto& s : series) {
    o << "<polyline fill='none' stroke='" << s.color << "' stroke-width='2' points='";
    for (std::size_t i = 0; i < x.size() && i < s.y.size(); ++i) o << px(x[i]) << ',' << py(s.y[i], s.right_axis) << ' ';
    o << "'/>\n";
    for (std::size_t i = 0; i < x.size() && i < s.y.size(); ++i)
      o << "<circle cx='" << px(x[i]) << "' cy='" << py(s.y[i], s.right_axis) << "' r='3' fill='" << s.color << "'/>\n";
    o << "<text x='" << l + 10 << "' y='" << t + 15 + 16 * legend++ << "' fill='" << s.color << "'>" << s.label
      << (s.right_axis ? " (right axis)" : " (left axis)") << "</text>\n";
  }
  o << "</svg>\n";
  out << o.str();
  out.close();
  if (!out) throw IoError(path + ": write failed");
}

}  // namespace earn::examples
