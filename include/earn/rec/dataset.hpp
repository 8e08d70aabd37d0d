// earn/rec/dataset.hpp - a sequential-recommendation data set in the LC-Rec layout, turned into prediction cases.
//
// Files (Amazon Beauty names by default, see ../shared/data/README.md):
//   sequential_train.txt   one line per user: `user_id item_id ...`, chronological, 1-based ids
//   sequential_valid.txt   `user_id [item_id ...]`, the next period; a user may have none
//   sequential_test.txt    the same, the last period
//   *.json                 `{"<0-based item>": ["<a_N>", "<b_N>", "<c_N>", "<d_N>"]}`, keys exactly 0..N-1
// Inside earn every id is 0-based: user u is file user u + 1, item i is file item i + 1 and JSON key "i".
//
// Cases follow the LLMRec protocol (EARN.md), with history capped at the last `history_len` (20) items:
//   train  every prefix of a user's training sequence predicts its next item: i1..ij -> i(j+1), j = 1..n-1
//   valid  history = training items, target = the first validation item; users without one have no case
//   test   history = (training + validation items), targets = all test items; one case per user, users without
//          test items keep an empty target list (metrics skip them)
// Targets are given as items and as identifiers (items sharing all 4 codes are one identifier, catalogue.hpp).
#pragma once

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <filesystem>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/core/error.hpp"
#include "earn/io/bytes.hpp"
#include "earn/rec/catalogue.hpp"
#include "earn/rec/item_vocab.hpp"

namespace earn::rec {

/// A data set's three splits.
enum class DataSplit { kTrain, kValid, kTest };

inline const char* split_name(DataSplit s) {
  return s == DataSplit::kTrain ? "train" : s == DataSplit::kValid ? "valid" : "test";
}

/// One prediction: a user's recent history and what comes next.
struct Case {
  int user = 0;                   ///< 0-based user
  std::vector<int> history;       ///< 0-based items, oldest first, at most history_len
  std::vector<int> target_items;  ///< 0-based items to predict (one for train/valid, all test items for test)
  std::vector<int> targets;       ///< identifiers of target_items, same order
};

/// File names and the history cap.
struct DatasetOptions {
  std::string train_file = "sequential_train.txt";
  std::string valid_file = "sequential_valid.txt";
  std::string test_file = "sequential_test.txt";
  std::string codes_file = "beauty.LCRec-1e-3lr.json";
  int history_len = 20;  ///< items of history kept, the most recent ones
};

/// The contents of a data set's four files (Dataset::parse).
struct DatasetTexts {
  std::string train, valid, test, codes;
};

/// Sizes of a loaded data set.
struct DatasetCounts {
  int users = 0;
  int items = 0;
  int identifiers = 0;                   ///< distinct code tuples
  std::int64_t train_interactions = 0;   ///< item ids in the training file
  std::int64_t valid_interactions = 0;
  std::int64_t test_interactions = 0;
  std::int64_t train_samples = 0;               ///< prefix -> next-item cases
  int valid_cases = 0;                   ///< users with at least one validation item
  int test_users_with_targets = 0;       ///< users with at least one test item (the metrics' denominator)
};

/// A loaded data set: per-user sequences, the item catalogue and the cases of each split.
/// \code
///   auto ds = earn::rec::Dataset::load("../shared/data/amazon-beauty");
///   for (const earn::rec::Case& c : ds.cases(earn::rec::DataSplit::kTest)) { ... c.history, c.targets ... }
/// \endcode
class Dataset {
 public:
  /// Loads the four files from `dir`. IoError when a file cannot be read (absent, a directory, ...); FormatError
  /// naming the file, the line (or JSON item) and the field for malformed contents; ConfigError for a history cap
  /// below 1.
  static Dataset load(const std::filesystem::path& dir, const DatasetOptions& opt = {}) {
    check_options(opt);
    const auto train = dir / opt.train_file, valid = dir / opt.valid_file, test = dir / opt.test_file,
               codes = dir / opt.codes_file;
    return build(opt, {io::detail::read_file_text(train), train.string()},
                 {io::detail::read_file_text(valid), valid.string()}, {io::detail::read_file_text(test), test.string()},
                 {io::detail::read_file_text(codes), codes.string()});
  }

  /// The same from the four files' contents held in memory; errors name the files by `opt`'s file names.
  static Dataset parse(const DatasetTexts& texts, const DatasetOptions& opt = {}) {
    check_options(opt);
    return build(opt, {texts.train, opt.train_file}, {texts.valid, opt.valid_file}, {texts.test, opt.test_file},
                 {texts.codes, opt.codes_file});
  }

  int n_users() const { return static_cast<int>(train_.size()); }
  int n_items() const { return catalogue_.n_items(); }
  int n_identifiers() const { return catalogue_.n_identifiers(); }
  int history_len() const { return history_len_; }
  const Catalogue& catalogue() const { return catalogue_; }

  /// A user's items of one split, 0-based, chronological.
  std::span<const int> items(DataSplit s, int user) const {
    if (user < 0 || user >= n_users())
      throw RangeError("dataset: user " + std::to_string(user) + " is outside [0, " + std::to_string(n_users()) +
                       ")");
    return sequences(s)[user];
  }
  /// The prediction cases of one split (see the file comment).
  std::span<const Case> cases(DataSplit s) const {
    return s == DataSplit::kTrain ? train_cases_ : s == DataSplit::kValid ? valid_cases_ : test_cases_;
  }

  DatasetCounts counts() const {
    DatasetCounts c;
    c.users = n_users();
    c.items = n_items();
    c.identifiers = n_identifiers();
    for (int u = 0; u < n_users(); ++u) {
      c.train_interactions += std::int64_t(train_[u].size());
      c.valid_interactions += std::int64_t(valid_[u].size());
      c.test_interactions += std::int64_t(test_[u].size());
      c.test_users_with_targets += test_[u].empty() ? 0 : 1;
    }
    c.train_samples = std::int64_t(train_cases_.size());
    c.valid_cases = static_cast<int>(valid_cases_.size());
    return c;
  }

 private:
  using Sequences = std::vector<std::vector<int>>;

  const Sequences& sequences(DataSplit s) const {
    return s == DataSplit::kTrain ? train_ : s == DataSplit::kValid ? valid_ : test_;
  }

  // The last history_len_ items of a ++ b.
  std::vector<int> recent(std::span<const int> a, std::span<const int> b) const {
    std::vector<int> h(a.begin(), a.end());
    h.insert(h.end(), b.begin(), b.end());
    if (static_cast<int>(h.size()) > history_len_) h.erase(h.begin(), h.end() - history_len_);
    return h;
  }

  Case make_case(int user, std::vector<int> history, std::span<const int> target_items) const {
    Case c{user, std::move(history), {target_items.begin(), target_items.end()}, {}};
    for (int item : c.target_items) c.targets.push_back(catalogue_.identifier(item));
    return c;
  }

  void build_cases() {
    for (int u = 0; u < n_users(); ++u) {
      const std::vector<int>& tr = train_[u];
      for (std::size_t j = 1; j < tr.size(); ++j)
        train_cases_.push_back(make_case(u, recent(std::span(tr).first(j), {}), std::span(tr).subspan(j, 1)));
      if (!valid_[u].empty()) valid_cases_.push_back(make_case(u, recent(tr, {}), std::span(valid_[u]).first(1)));
      test_cases_.push_back(make_case(u, recent(tr, valid_[u]), test_[u]));
    }
  }

  // One file's contents and the name its errors carry.
  struct NamedText {
    std::string_view text;
    std::string name;
  };

  static void check_options(const DatasetOptions& opt) {
    if (opt.history_len < 1) throw ConfigError("dataset: history_len must be >= 1");
  }

  static Dataset build(const DatasetOptions& opt, const NamedText& train, const NamedText& valid,
                       const NamedText& test, const NamedText& codes) {
    Dataset ds;
    ds.history_len_ = opt.history_len;
    ds.catalogue_ = Catalogue(read_codes(codes));
    const int n_items = ds.catalogue_.n_items();
    ds.train_ = read_sequences(train, n_items, -1);
    const int n_users = static_cast<int>(ds.train_.size());
    ds.valid_ = read_sequences(valid, n_items, n_users);
    ds.test_ = read_sequences(test, n_items, n_users);
    ds.build_cases();
    return ds;
  }

  // A 1-based id: canonical decimal digits, at least 1, at most 9 digits (so it cannot overflow int).
  static int parse_id(const std::string& file, std::string_view s, const std::string& field) {
    for (char ch : s)
      if (ch < '0' || ch > '9') earn::detail::throw_format(file, field, "\"" + std::string(s) + "\" is not a positive integer");
    if (s.size() > 9) earn::detail::throw_format(file, field, "\"" + std::string(s) + "\" is too large");
    int v = 0;
    std::from_chars(s.data(), s.data() + s.size(), v);
    if (v == 0) earn::detail::throw_format(file, field, "id 0: ids in this file are 1-based");
    return v;
  }

  // Lines `user_id item_id ...` with user ids 1, 2, 3, ... in order. `n_users` < 0: any count (the training
  // file defines the users); otherwise the file must list exactly users 1..n_users.
  static Sequences read_sequences(const NamedText& in, int n_items, int n_users) {
    const std::string& file = in.name;
    const std::string_view text = in.text;
    Sequences seqs;
    std::size_t pos = 0;
    int line_no = 0;
    while (pos < text.size()) {
      std::size_t end = text.find('\n', pos);
      if (end == std::string::npos) end = text.size();
      std::string_view line(text.data() + pos, end - pos);
      pos = end + 1;
      ++line_no;
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      const std::string where = "line " + std::to_string(line_no);
      std::vector<std::string_view> fields;
      for (std::size_t i = 0; i < line.size();) {
        if (line[i] == ' ' || line[i] == '\t') {
          ++i;
          continue;
        }
        std::size_t j = i;
        while (j < line.size() && line[j] != ' ' && line[j] != '\t') ++j;
        fields.push_back(line.substr(i, j - i));
        i = j;
      }
      if (fields.empty()) earn::detail::throw_format(file, where, "empty line, expected `user_id [item_id ...]`");
      const int user = parse_id(file, fields[0], where + " field 1 (user id)");
      const int expected = static_cast<int>(seqs.size()) + 1;
      if (user < expected)
        earn::detail::throw_format(file, where + " field 1 (user id)",
                             "user " + std::to_string(user) + " is duplicated or out of order (expected user " +
                                 std::to_string(expected) + ")");
      if (user > expected)
        earn::detail::throw_format(file, where + " field 1 (user id)",
                             "user " + std::to_string(user) + " is out of order: expected user " +
                                 std::to_string(expected) + " (one line per user, ids 1, 2, 3, ...)");
      if (n_users >= 0 && user > n_users)
        earn::detail::throw_format(file, where + " field 1 (user id)",
                             "user " + std::to_string(user) + " is not in the training file (" +
                                 std::to_string(n_users) + " users)");
      std::vector<int> items;
      items.reserve(fields.size() - 1);
      for (std::size_t f = 1; f < fields.size(); ++f) {
        const std::string field = where + " field " + std::to_string(f + 1) + " (item id)";
        const int item = parse_id(file, fields[f], field);
        if (item > n_items)
          earn::detail::throw_format(file, field,
                               "item " + std::to_string(item) + " has no codes (the codes file has " +
                                   std::to_string(n_items) + " items)");
        items.push_back(item - 1);
      }
      seqs.push_back(std::move(items));
    }
    if (seqs.empty()) earn::detail::throw_format(file, "line 1", "no users");
    if (n_users >= 0 && static_cast<int>(seqs.size()) != n_users)
      earn::detail::throw_format(file, "line " + std::to_string(line_no + 1),
                           "file ends after user " + std::to_string(seqs.size()) + ", the training file has " +
                               std::to_string(n_users) + " users");
    return seqs;
  }

  // SAX handler for `{"<item>": ["<a_N>", "<b_N>", "<c_N>", "<d_N>"], ...}`: no DOM, stops at the first problem.
  struct CodesHandler : nlohmann::json_sax<nlohmann::json> {
    std::vector<std::pair<int, ItemCodes>> entries;  // (key, codes) in file order
    std::string error_field, error;
    int depth = 0;  // 0 outside the root object, 1 inside it, 2 inside an item's array
    int item = -1;  // the current key
    int level = 0;
    ItemCodes current{};

    std::string field() const { return item < 0 ? std::string("root") : "item \"" + std::to_string(item) + "\""; }
    bool fail(std::string f, std::string what) {
      if (error.empty()) {
        error_field = std::move(f);
        error = std::move(what);
      }
      return false;
    }
    bool unexpected(const char* what) {
      if (depth == 0) return fail("root", std::string("expected a JSON object, found ") + what);
      if (depth == 1) return fail(field(), std::string("expected an array of 4 code strings, found ") + what);
      return fail(field() + " level " + std::to_string(level), std::string("expected a code string, found ") + what);
    }
    bool null() override { return unexpected("null"); }
    bool boolean(bool) override { return unexpected("a boolean"); }
    bool number_integer(number_integer_t) override { return unexpected("a number"); }
    bool number_unsigned(number_unsigned_t) override { return unexpected("a number"); }
    bool number_float(number_float_t, const string_t&) override { return unexpected("a number"); }
    bool binary(binary_t&) override { return unexpected("binary data"); }
    bool start_object(std::size_t) override {
      if (depth != 0) return unexpected("an object");
      depth = 1;
      return true;
    }
    bool end_object() override {
      depth = 0;
      return true;
    }
    bool key(string_t& k) override {
      bool digits = !k.empty() && k.size() <= 9 && (k.size() == 1 || k[0] != '0');
      for (char ch : k) digits = digits && ch >= '0' && ch <= '9';
      if (!digits) return fail("key \"" + k + "\"", "item keys are canonical non-negative integers below 1e9");
      item = std::stoi(k);
      return true;
    }
    bool start_array(std::size_t) override {
      if (depth != 1) return unexpected("an array");
      depth = 2;
      level = 0;
      return true;
    }
    bool end_array() override {
      if (level != kCodeLevels)
        return fail(field(), "has " + std::to_string(level) + " codes, expected " + std::to_string(kCodeLevels));
      entries.emplace_back(item, current);
      depth = 1;
      return true;
    }
    bool string(string_t& s) override {
      if (depth != 2) return unexpected("a string");
      if (level >= kCodeLevels) return fail(field(), "has more than " + std::to_string(kCodeLevels) + " codes");
      const std::string f = field() + " level " + std::to_string(level);
      std::string why;
      const auto lc = ItemVocab::parse(s, &why);
      if (!lc) return fail(f, why);
      if ((*lc)[0] != level)
        return fail(f, "\"" + s + "\" is a level-" + std::string(1, char('a' + (*lc)[0])) + " code, expected <" +
                           std::string(1, char('a' + level)) + "_N>");
      current[level++] = (*lc)[1];
      return true;
    }
    bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& ex) override {
      return fail("json", ex.what());
    }
  };

  static std::vector<ItemCodes> read_codes(const NamedText& in) {
    const std::string& file = in.name;
    const std::string_view text = in.text;
    CodesHandler h;
    const bool ok = nlohmann::json::sax_parse(text, &h);
    if (!ok || !h.error.empty())
      earn::detail::throw_format(file, h.error.empty() ? "json" : h.error_field, h.error.empty() ? "invalid" : h.error);
    if (h.entries.empty()) earn::detail::throw_format(file, "root", "no items");
    // Keys must be exactly 0..N-1: sorted, key i sits at index i; a repeat or a gap shows at the first mismatch.
    std::stable_sort(h.entries.begin(), h.entries.end(),
                     [](const auto& a, const auto& b) { return a.first < b.first; });
    std::vector<ItemCodes> codes(h.entries.size());
    for (std::size_t i = 0; i < h.entries.size(); ++i) {
      const int k = h.entries[i].first;
      if (k < static_cast<int>(i))
        earn::detail::throw_format(file, "key \"" + std::to_string(k) + "\"", "duplicate item key");
      if (k > static_cast<int>(i))
        earn::detail::throw_format(file, "key \"" + std::to_string(i) + "\"",
                             "missing: item keys must be 0..N-1 for N = " + std::to_string(h.entries.size()) +
                                 " items, found key " + std::to_string(k));
      codes[i] = h.entries[i].second;
    }
    return codes;
  }

  Catalogue catalogue_;
  int history_len_ = 20;
  Sequences train_, valid_, test_;  // per user, 0-based items
  std::vector<Case> train_cases_, valid_cases_, test_cases_;
};

}  // namespace earn::rec
