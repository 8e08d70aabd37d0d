// Recommendation data: the Amazon Beauty files against an independent recount of the raw text, typed errors for
// hostile inputs, the code-token vocabulary layout and the prompt builder's token layout.
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <unistd.h>

#include "earn/rec/dataset.hpp"
#include "earn/rec/item_vocab.hpp"
#include "earn/rec/metrics.hpp"
#include "earn/rec/prompt.hpp"
#include "support.hpp"

#if __has_include("earn/tokenizer/llama2c.hpp")
#include "earn/tokenizer/llama2c.hpp"
#define EARN_TEST_HAVE_LLAMA2C_TOKENIZER 1
#endif

using namespace earn;
using namespace earn::rec;
namespace fs = std::filesystem;

namespace {

// Raw lines of a sequential file as lists of integers, via iostreams (not the loader's parser).
std::vector<std::vector<long>> raw_lines(const fs::path& p) {
  std::ifstream in(p);
  std::vector<std::vector<long>> out;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ss(line);
    std::vector<long> v;
    long x;
    while (ss >> x) v.push_back(x);
    out.push_back(v);
  }
  return out;
}

// A scratch directory holding the four files of a data set, removed on destruction.
struct TempDataset {
  fs::path dir;
  explicit TempDataset(const std::string& name) {
    dir = fs::temp_directory_path() / ("earn_rec_" + name + "_" + std::to_string(::getpid()));
    fs::create_directories(dir);
    // A valid baseline: 3 users, 4 items (items 1 and 3, 1-based, share codes).
    write("sequential_train.txt", "1 1 2 3\n2 2 4\n3 4\n");
    write("sequential_valid.txt", "1 4\n2\n3 1 2\n");
    write("sequential_test.txt", "1\n2 3 1\n3\n");
    write("beauty.LCRec-1e-3lr.json",
          R"({"0": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], "1": ["<a_1>", "<b_2>", "<c_3>", "<d_5>"],
              "2": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], "3": ["<a_255>", "<b_0>", "<c_0>", "<d_0>"]})");
  }
  ~TempDataset() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
  void write(const std::string& name, const std::string& text) const {
    std::ofstream out(dir / name, std::ios::binary);
    out << text;
  }
};

// Loading must fail with FormatError whose message names the file and contains every fragment of `want`.
void expect_format_error(const TempDataset& t, const std::string& file, const std::vector<std::string>& want) {
  try {
    (void)Dataset::load(t.dir);
    FAIL_CHECK("no error for a malformed " << file);
  } catch (const FormatError& e) {
    const std::string msg = e.what();
    INFO(msg);
    CHECK(msg.find(file) != std::string::npos);
    for (const auto& w : want) CHECK(msg.find(w) != std::string::npos);
  }
}

}  // namespace

TEST_CASE("Amazon Beauty: counts and cases agree with a naive recount of the raw files") {
  EARN_REQUIRE_SHARED(dir, "amazon-beauty/sequential_train.txt");
  const fs::path root = dir.parent_path();
  const Dataset ds = Dataset::load(root);
  const DatasetCounts c = ds.counts();
  CHECK(c.users == 19383);
  CHECK(c.items == 12035);
  CHECK(c.train_interactions == 122241);  // README.md

  // Independent recount: iostreams over the text, a DOM parse of the JSON, code tuples compared as strings.
  const auto train = raw_lines(root / "sequential_train.txt");
  const auto valid = raw_lines(root / "sequential_valid.txt");
  const auto test = raw_lines(root / "sequential_test.txt");
  std::ifstream jin(root / "beauty.LCRec-1e-3lr.json");
  const nlohmann::json j = nlohmann::json::parse(jin);
  std::set<std::string> tuples;
  for (auto it = j.begin(); it != j.end(); ++it) tuples.insert(it.value().dump());
  long samples = 0, valid_cases = 0, test_users = 0;
  for (const auto& l : train) samples += l.size() > 2 ? long(l.size()) - 2 : 0;
  for (const auto& l : valid) valid_cases += l.size() > 1;
  for (const auto& l : test) test_users += l.size() > 1;
  CHECK(c.identifiers == long(tuples.size()));
  CHECK(c.train_samples == samples);
  CHECK(c.valid_cases == valid_cases);
  CHECK(c.test_users_with_targets == test_users);
  // The numbers reported in the README.
  CHECK(c.identifiers == 12023);
  CHECK(samples == 102858);
  CHECK(valid_cases == 4295);
  CHECK(test_users == 3553);
  CHECK(ds.cases(DataSplit::kTest).size() == 19383u);

  // Every case rebuilt from the raw lines: histories are the last 20 items, ids shift to 0-based.
  auto tail20 = [](std::vector<long> v) {
    if (v.size() > 20) v.erase(v.begin(), v.end() - 20);
    std::vector<int> out;
    for (long x : v) out.push_back(int(x - 1));
    return out;
  };
  std::size_t ti = 0, vi = 0;
  const auto train_cases = ds.cases(DataSplit::kTrain);
  const auto valid_cases_v = ds.cases(DataSplit::kValid);
  const auto test_cases = ds.cases(DataSplit::kTest);
  bool all_ok = true;
  for (std::size_t u = 0; u < train.size(); ++u) {
    std::vector<long> tr(train[u].begin() + 1, train[u].end());
    for (std::size_t n = 1; n < tr.size(); ++n, ++ti) {
      const Case& cs = train_cases[ti];
      all_ok = all_ok && cs.user == int(u) && cs.history == tail20(std::vector<long>(tr.begin(), tr.begin() + long(n))) &&
               cs.target_items == std::vector<int>{int(tr[n] - 1)};
    }
    std::vector<long> va(valid[u].begin() + 1, valid[u].end());
    if (!va.empty()) {
      const Case& cs = valid_cases_v[vi++];
      all_ok = all_ok && cs.user == int(u) && cs.history == tail20(tr) && cs.target_items == std::vector<int>{int(va[0] - 1)};
    }
    std::vector<long> hist = tr;
    hist.insert(hist.end(), va.begin(), va.end());
    std::vector<int> te;
    for (std::size_t i = 1; i < test[u].size(); ++i) te.push_back(int(test[u][i] - 1));
    const Case& cs = test_cases[u];
    all_ok = all_ok && cs.user == int(u) && cs.history == tail20(hist) && cs.target_items == te;
    // Targets as identifiers: same codes (raw JSON arrays) <=> same identifier.
    for (std::size_t i = 0; i < te.size(); ++i)
      all_ok = all_ok && j[std::to_string(te[i])].dump() ==
                             j[std::to_string(ds.catalogue().items_of(cs.targets[i])[0])].dump();
    if (!all_ok) {
      FAIL_CHECK("case mismatch at user " << u + 1);
      break;
    }
  }
  CHECK(ti == train_cases.size());
  CHECK(vi == valid_cases_v.size());
  // The first user, spelled out: train 1955 28 12031 2758 2273 9634, valid 11791, test 3004.
  CHECK(test_cases[0].history == std::vector<int>{1954, 27, 12030, 2757, 2272, 9633, 11790});
  CHECK(test_cases[0].target_items == std::vector<int>{3003});
}

TEST_CASE("Dataset: a small valid set gives the documented cases and identifiers") {
  TempDataset t("ok");
  const Dataset ds = Dataset::load(t.dir, {.history_len = 2});
  CHECK(ds.n_users() == 3);
  CHECK(ds.n_items() == 4);
  CHECK(ds.n_identifiers() == 3);  // items 0 and 2 share <a_1><b_2><c_3><d_4>
  CHECK(ds.catalogue().identifier(0) == ds.catalogue().identifier(2));
  const auto tr = ds.cases(DataSplit::kTrain);
  REQUIRE(tr.size() == 3u);  // user 1: [0]->1, [0,1]->2; user 2: [1]->3; user 3: none
  CHECK(tr[0].history == std::vector<int>{0});
  CHECK(tr[1].history == std::vector<int>{0, 1});
  CHECK(tr[1].targets == std::vector<int>{0});  // item 2 is identifier 0, like item 0
  CHECK(tr[2].history == std::vector<int>{1});
  const auto va = ds.cases(DataSplit::kValid);
  REQUIRE(va.size() == 2u);
  CHECK(va[0].history == std::vector<int>{1, 2});  // capped at 2
  CHECK(va[1].user == 2);
  CHECK(va[1].target_items == std::vector<int>{0});  // only the first validation item
  const auto te = ds.cases(DataSplit::kTest);
  REQUIRE(te.size() == 3u);
  CHECK(te[0].targets.empty());
  CHECK(te[1].history == std::vector<int>{1, 3});
  CHECK(te[1].target_items == std::vector<int>{2, 0});
  CHECK(te[2].history == std::vector<int>{0, 1});  // (train 3) + (valid 0, 1), last 2
  CHECK(ds.counts().test_users_with_targets == 1);
  CHECK_THROWS_AS(Dataset::load(t.dir, {.history_len = 0}), ConfigError);
  CHECK_THROWS_AS(ds.items(DataSplit::kTrain, 3), RangeError);
}

TEST_CASE("Dataset: malformed text files are FormatErrors naming file, line and field") {
  const std::string tr = "sequential_train.txt", va = "sequential_valid.txt", te = "sequential_test.txt";
  struct Bad {
    std::string file, text;
    std::vector<std::string> want;
  };
  const std::vector<Bad> cases = {
      {tr, "1 1 x\n2 2\n3 4\n", {"line 1", "field 3", "\"x\""}},
      {tr, "1 1 -2\n2 2\n3 4\n", {"line 1", "field 3"}},
      {tr, "1 1 0\n2 2\n3 4\n", {"line 1", "field 3", "1-based"}},
      {tr, "1 1 2\n2 2 99999999999\n3 4\n", {"line 2", "field 3", "too large"}},
      {tr, "1 1 2\n2 2 5\n3 4\n", {"line 2", "field 3", "no codes"}},
      {tr, "1 1 2\n3 2\n2 4\n", {"line 2", "user id", "out of order"}},
      {tr, "1 1 2\n1 2\n2 4\n", {"line 2", "user id", "duplicated"}},
      {tr, "0 1 2\n", {"line 1", "user id"}},
      {tr, "1 1 2\n\n2 4\n", {"line 2", "empty line"}},
      {tr, "1 1 2.5\n", {"line 1", "field 3"}},
      {tr, "1 1 +2\n", {"line 1", "field 3"}},
      {tr, "", {"no users"}},
      {va, "1 4\n2\n3 1 2\n4 1\n", {"line 4", "not in the training file"}},
      {va, "1 4\n2\n", {"ends after user 2", "3 users"}},
      {te, "1\n2 3 1\n2\n", {"line 3", "duplicated"}},
      {te, "1\n2 3 1\n3 a\n", {"line 3", "field 2"}},
  };
  for (const Bad& b : cases) {
    CAPTURE(b.text);
    TempDataset t("txt");
    t.write(b.file, b.text);
    expect_format_error(t, b.file, b.want);
  }
  // Windows line endings and a missing final newline are accepted.
  TempDataset t("crlf");
  t.write(tr, "1 1 2 3\r\n2 2 4\r\n3 4");
  CHECK(Dataset::load(t.dir).counts().train_samples == 3);
}

TEST_CASE("Dataset: malformed codes are FormatErrors naming the item and level") {
  const std::string js = "beauty.LCRec-1e-3lr.json";
  const std::string ok1 = R"("1": ["<a_1>", "<b_2>", "<c_3>", "<d_5>"], "2": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"],
                             "3": ["<a_2>", "<b_0>", "<c_0>", "<d_0>"])";
  struct Bad {
    std::string json;
    std::vector<std::string> want;
  };
  const std::vector<Bad> cases = {
      {R"({"0": ["<a_256>", "<b_2>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"item \"0\" level 0", "outside [0, 256)"}},
      {R"({"0": ["<b_1>", "<b_2>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"item \"0\" level 0", "level-b", "<a_N>"}},
      {R"({"0": ["<a_1>", "<b_2>", "<e_3>", "<d_4>"], )" + ok1 + "}", {"item \"0\" level 2", "level letter"}},
      {R"({"0": ["<a_1>", "<b_x>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"item \"0\" level 1", "not a decimal"}},
      {R"({"0": ["<a_1>", "<b_-2>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"item \"0\" level 1"}},
      {R"({"0": ["<a_1>", "<b_02>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"item \"0\" level 1", "leading zeros"}},
      {R"({"0": ["a_1", "<b_2>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"item \"0\" level 0", "not a code token"}},
      {R"({"0": ["<a_99999999999999>", "<b_2>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"item \"0\" level 0", "outside"}},
      {R"({"0": ["<a_1>", "<b_2>", "<c_3>"], )" + ok1 + "}", {"item \"0\"", "3 codes"}},
      {R"({"0": ["<a_1>", "<b_2>", "<c_3>", "<d_4>", "<d_5>"], )" + ok1 + "}", {"item \"0\"", "more than 4"}},
      {R"({"0": ["<a_1>", "<b_2>", "<c_3>", 4], )" + ok1 + "}", {"item \"0\" level 3", "a number"}},
      {R"({"0": "<a_1><b_2><c_3><d_4>", )" + ok1 + "}", {"item \"0\"", "expected an array"}},
      {R"({"0": [["<a_1>"]], )" + ok1 + "}", {"item \"0\" level 0", "an array"}},
      {R"({"x": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"key \"x\"", "non-negative integers"}},
      {R"({"-1": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"key \"-1\""}},
      {R"({"00": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], )" + ok1 + "}", {"key \"00\""}},
      {R"({"0": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], "2": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], )" + ok1 + "}",
       {"key \"2\"", "duplicate"}},
      {R"({"0": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], "1": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], "3": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], "999999999": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"]})",
       {"key \"2\"", "missing"}},
      {R"(["<a_1>"])", {"root", "JSON object"}},
      {R"({})", {"root", "no items"}},
      {R"({"0": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], )", {"json", "parse error"}},
      {R"({"0": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"]} trailing)", {"json"}},
      {"", {"json"}},
  };
  for (const Bad& b : cases) {
    CAPTURE(b.json);
    TempDataset t("json");
    t.write(js, b.json);
    expect_format_error(t, js, b.want);
  }
  // Fewer JSON items than the text files use: the text file names the item without codes.
  TempDataset t("few");
  t.write(js, R"({"0": ["<a_1>", "<b_2>", "<c_3>", "<d_4>"], "1": ["<a_1>", "<b_2>", "<c_3>", "<d_5>"]})");
  expect_format_error(t, "sequential_train.txt", {"line 1", "field 4", "item 3 has no codes"});
}

TEST_CASE("Dataset: unreadable files are IoErrors") {
  TempDataset t("io");
  fs::remove(t.dir / "sequential_test.txt");
  CHECK_THROWS_AS(Dataset::load(t.dir), IoError);
  CHECK_THROWS_AS(Dataset::load(t.dir / "nowhere"), IoError);
  // Directories where the files belong: an IoError that says so (it was a misleading JSON parse error), for the
  // codes file and for a text file.
  TempDataset d("dirs");
  fs::remove(d.dir / "beauty.LCRec-1e-3lr.json");
  fs::create_directory(d.dir / "beauty.LCRec-1e-3lr.json");
  CHECK_THROWS_WITH_AS(Dataset::load(d.dir), doctest::Contains("beauty.LCRec-1e-3lr.json: is a directory"), IoError);
  TempDataset e("dirs_text");
  fs::remove(e.dir / "sequential_valid.txt");
  fs::create_directory(e.dir / "sequential_valid.txt");
  CHECK_THROWS_WITH_AS(Dataset::load(e.dir), doctest::Contains("sequential_valid.txt: is a directory"), IoError);
  // A name past the file-name limit is an IoError too, never a std::filesystem_error.
  CHECK_THROWS_AS(Dataset::load(t.dir, {.codes_file = std::string(300, 'c')}), IoError);
}

TEST_CASE("Dataset: another codes file name, parse() from memory, and two test items of one identifier") {
  TempDataset t("names");
  fs::rename(t.dir / "beauty.LCRec-1e-3lr.json", t.dir / "games.index.json");
  CHECK_THROWS_AS(Dataset::load(t.dir), IoError);
  const Dataset ds = Dataset::load(t.dir, {.codes_file = "games.index.json"});
  CHECK(ds.n_items() == 4);
  auto text = [&](const char* f) {
    std::ifstream in(t.dir / f, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  const Dataset mem = Dataset::parse({text("sequential_train.txt"), text("sequential_valid.txt"),
                                      text("sequential_test.txt"), text("games.index.json")});
  CHECK(mem.counts().train_samples == ds.counts().train_samples);
  CHECK(mem.cases(DataSplit::kTest)[1].targets == ds.cases(DataSplit::kTest)[1].targets);
  CHECK_THROWS_WITH_AS(Dataset::parse({"1 9\n", "1\n", "1\n", text("games.index.json")}),
                       doctest::Contains("sequential_train.txt"), FormatError);

  // User 2's test items 3 and 1 (1-based) share one code tuple: two targets of identifier 0, as AtSpeed counts
  // them. Ranking identifier 0 first hits one of |T| = 2 targets; the ideal DCG runs over 2 positions.
  const Case& c = ds.cases(DataSplit::kTest)[1];
  REQUIRE(c.targets == std::vector<int>{0, 0});
  MetricAccumulator acc({5});
  acc.add(std::vector<int>{0, 1, 2}, c.targets);
  CHECK(acc.recall(5) == doctest::Approx(0.5).epsilon(1e-12));
  CHECK(acc.ndcg(5) == doctest::Approx(1.0 / (1.0 + 1.0 / std::log2(3.0))).epsilon(1e-12));
  CHECK(ds.counts().test_interactions == 2);  // test target items count both
}

TEST_CASE("ItemVocab: ids are base + level * 256 + code, both ways, and refuse what is not a code") {
  const ItemVocab v(32000);
  CHECK(v.size() == 32000 + 1024);
  CHECK(v.token(0, 0) == 32000);
  CHECK(v.token(1, 7) == 32000 + 256 + 7);
  CHECK(v.token(3, 255) == 32000 + 1023);
  for (int l = 0; l < 4; ++l)
    for (int c : {0, 1, 128, 255}) {
      const int id = v.token(l, c);
      CHECK(v.level_of(id) == l);
      CHECK(v.code_of(id) == c);
      const char* open[] = {"<a_", "<b_", "<c_", "<d_"};
      CHECK(v.text(id) == std::string(open[l]) + std::to_string(c) + ">");
      CHECK(ItemVocab::parse(v.text(id)) == std::array<int, 2>{l, c});
    }
  CHECK_THROWS_AS(v.token(4, 0), RangeError);
  CHECK_THROWS_AS(v.token(0, 256), RangeError);
  CHECK_THROWS_AS(v.token(-1, 0), RangeError);
  CHECK_THROWS_AS(v.level_of(31999), RangeError);
  CHECK_THROWS_AS(v.code_of(33024), RangeError);
  CHECK_THROWS_AS(ItemVocab(-1), ConfigError);

  const Catalogue cat({{1, 2, 3, 4}, {5, 6, 7, 8}, {1, 2, 3, 4}});
  const ItemTokens t = v.item_tokens(cat, 1);
  CHECK(t == ItemTokens{32005, 32000 + 256 + 6, 32000 + 512 + 7, 32000 + 768 + 8});
  CHECK(v.identifier_of(cat, t) == 1);
  CHECK(v.identifier_of(cat, v.item_tokens(cat, 2)) == 0);
  CHECK(v.identifier_tokens(cat, 0) == v.item_tokens(cat, 0));
  const ItemTokens swapped{t[1], t[0], t[2], t[3]};
  CHECK_THROWS_AS(v.identifier_of(cat, swapped), RangeError);  // levels out of order
  const ItemTokens absent{v.token(0, 9), t[1], t[2], t[3]};
  CHECK_THROWS_AS(v.identifier_of(cat, absent), RangeError);
  CHECK_THROWS_AS(v.item_tokens(cat, 3), RangeError);
  CHECK_THROWS_AS(Catalogue({{1, 2, 3, 256}}), RangeError);
}

TEST_CASE("PromptBuilder: code-template layout, spelled out") {
  const Catalogue cat({{1, 2, 3, 4}, {5, 6, 7, 8}, {9, 10, 11, 12}});
  const auto pb = PromptBuilder::code_tokens();
  const int b = CodeTemplate::kBaseVocab;  // 4
  const std::vector<int> hist{2, 0};
  const std::vector<int> want{0, 1,                                   // BOS, instruction
                              b + 9, b + 256 + 10, b + 512 + 11, b + 768 + 12,  // item 2
                              2,                                      // separator
                              b + 1, b + 256 + 2, b + 512 + 3, b + 768 + 4,     // item 0
                              3};                                     // response
  CHECK(pb.build(cat, hist) == want);
  CHECK(pb.length(2) == int(want.size()));
  CHECK(pb.build(cat, std::vector<int>{}) == std::vector<int>{0, 1, 3});
  CHECK(pb.length(0) == 3);
  CHECK(pb.length(20) == 3 + 80 + 19);
  const std::vector<int> one{1};
  CHECK(pb.build(cat, one).size() == 7u);
  const std::vector<int> bad{3};
  CHECK_THROWS_AS(pb.build(cat, bad), RangeError);
  // Template ids must stay below the code tokens.
  CHECK_THROWS_AS(PromptBuilder::code_tokens(ItemVocab(3)), ConfigError);
}

namespace {
// A toy tokenizer: BOS = 1, then one id per byte (byte + 10), EOS = 2.
struct ByteTokenizer {
  std::vector<int> encode(std::string_view s, bool bos, bool eos) const {
    std::vector<int> ids;
    if (bos) ids.push_back(1);
    for (unsigned char ch : s) ids.push_back(ch + 10);
    if (eos) ids.push_back(2);
    return ids;
  }
};
std::vector<int> bytes_of(const std::string& s) {
  std::vector<int> v;
  for (unsigned char ch : s) v.push_back(ch + 10);
  return v;
}
}  // namespace

TEST_CASE("PromptBuilder: text template = BOS, encoded head, items with encoded separators, encoded tail") {
  const Catalogue cat({{1, 2, 3, 4}, {5, 6, 7, 8}});
  const ItemVocab vocab(300);
  const auto pb = PromptBuilder::text(ByteTokenizer{}, vocab);
  const std::string head = "### Instruction: The user has interacted with items ";
  const std::string tail =
      " in chronological order. Can you predict the next possible item that the user may expect?\n### Response:";
  std::vector<int> want{1};
  for (int x : bytes_of(head)) want.push_back(x);
  for (int l = 0; l < 4; ++l) want.push_back(300 + 256 * l + 5 + l);
  for (int x : bytes_of(", ")) want.push_back(x);
  for (int l = 0; l < 4; ++l) want.push_back(300 + 256 * l + 1 + l);
  for (int x : bytes_of(tail)) want.push_back(x);
  const std::vector<int> hist{1, 0};
  CHECK(pb.build(cat, hist) == want);
  CHECK(pb.length(2) == int(want.size()));
  CHECK(pb.render(cat, hist) == head + "<a_5><b_6><c_7><d_8>, <a_1><b_2><c_3><d_4>" + tail);
  // A tokenizer whose ids reach into the code range is refused.
  CHECK_THROWS_AS(PromptBuilder::text(ByteTokenizer{}, ItemVocab(100)), ConfigError);  // 'a' is id 107
}

#ifdef EARN_TEST_HAVE_LLAMA2C_TOKENIZER
TEST_CASE("PromptBuilder: text template with the llama2.c tokenizer decodes back to the template text") {
  EARN_REQUIRE_SHARED(tok_path, "llama2c/tok512.bin");
  const Llama2cTokenizer tok(tok_path);
  const Catalogue cat({{1, 2, 3, 4}, {5, 6, 7, 8}});
  const ItemVocab vocab(512);
  const auto pb = PromptBuilder::text(tok, vocab);
  const std::vector<int> hist{0, 1};
  const auto ids = pb.build(cat, hist);
  // Split at the code tokens: three text runs around two items of 4 codes each.
  std::vector<std::vector<int>> runs(1);
  int codes = 0;
  for (int id : ids) {
    if (vocab.is_code_token(id)) {
      ++codes;
      if (!runs.back().empty()) runs.emplace_back();
    } else {
      runs.back().push_back(id);
    }
  }
  CHECK(codes == 8);
  REQUIRE(runs.size() == 3u);
  CHECK(runs[0].front() == Llama2cTokenizer::kBos);
  CHECK(tok.decode(runs[0]).find("Instruction: The user has interacted with items") != std::string::npos);
  CHECK(tok.decode(runs[2]).find("Can you predict the next possible item") != std::string::npos);
}
#endif
